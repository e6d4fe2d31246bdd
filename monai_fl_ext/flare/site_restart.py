"""Site-restart drill in FLARE's POC mode: a real site process tree killed mid-round and started again.

What FLARE does and what it does not (NVIDIA FLARE 2.9, read from its source and measured by this drill):

- the killed site stops answering; the server's rounds go on with the others because the job sets
  ``min_clients`` below the number of sites, a finite ``train_timeout`` and a short
  ``wait_time_after_min_received`` (each round waits that long for the missing site, then aggregates);
- the site restarted with its participant's ``startup/start.sh`` registers again with the server (a new
  token; it appears in the admin API's ``check_status`` with a fresh ``last_connect_time``);
- but FLARE cannot put it back into the job that was running: a site's job process (CJ) is started only
  when the job is deployed ("since we don't have CJ restart capability" in
  ``nvflare/private/fed/client/communicator.py``), and the server job's participant list keeps the old
  entry. Our controller targets every participant each round, so nothing in its sampling is missing:
  there is simply no process of that site in the job to answer.

So the drill hands the federation over to a fresh job once the site is back: it aborts the running job
with the admin API (after ``observe_rounds`` more rounds, which show the site still absent) and submits
the same job with ``resume=True``. That job continues from the server checkpoint of the last completed
round (global model, round number, history, audit trail) and is deployed to every registered site, so
the restarted site trains again; its privacy accountant lives in its own output folder
(``sites/<site>/privacy_accountant.json``), so its epsilon continues from where it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

POLL_S = 0.2


@dataclass
class SiteRestartPlan:
    """When the drill kills and restarts which site.

    Args:
        site: the site whose process tree is killed.
        kill_round: the round in which it is killed (>= 1, so it contributed before).
        restart_after_rounds: the site is started again when this many rounds have started since the kill
            (2: killed in round k, started again as round k + 2 begins).
        observe_rounds: whole rounds the running job runs after the site registered again, before the handover
            (they show FLARE does not bring the site back into that job). 0 hands over as the restart round
            begins, at the same moment the site is started.
        kill_delay: seconds after the site took its training task of round ``kill_round`` before the kill.
    """

    site: str = "site-2"
    kill_round: int = 1
    restart_after_rounds: int = 2
    observe_rounds: int = 0
    kill_delay: float = 1.0

    def validate(self, sites: list[str], num_rounds: int) -> None:
        """Check the plan against the job.

        Raises:
            InputError: naming the first bad setting.
        """
        from monai_fl_ext.errors import InputError

        if self.site not in sites:
            raise InputError(f"site-restart drill: site {self.site!r} is not one of the job's sites {sites}")
        if len(sites) < 2:
            raise InputError("site-restart drill: needs at least 2 sites (the others carry the rounds without the killed one)")
        # the site registers again during round kill_round + restart_after_rounds at the earliest
        last = self.kill_round + self.restart_after_rounds + (1 + self.observe_rounds if self.observe_rounds else 0)
        if self.kill_round < 1 or self.restart_after_rounds < 1 or self.observe_rounds < 0 or last >= num_rounds:
            raise InputError(f"site-restart drill: need 1 <= kill_round, 1 <= restart_after_rounds, 0 <= observe_rounds and "
                             f"kill_round + restart_after_rounds (+ 1 + observe_rounds when observing) < num_rounds so the site can "
                             f"rejoin; got {self.kill_round}, {self.restart_after_rounds}, {self.observe_rounds} with {num_rounds} rounds")


# ---- processes of one POC participant ------------------------------------------------------------


def site_processes(site_dir: Path) -> list[Any]:
    """The live processes of the POC participant in ``site_dir``: its start script's loop, client and job processes.

    Found by FLARE's pid files (``daemon_pid.fl``, ``pid.fl``) and by command lines naming the participant's
    folder, plus all their descendants, so only this drill's site is matched (other POC runs on the machine
    have other workspace paths).

    Args:
        site_dir: the participant's folder in the POC workspace (``.../prod_00/site-2``).

    Returns:
        psutil processes, parents first.
    """
    import psutil

    roots: dict[int, Any] = {}
    for name in ("daemon_pid.fl", "pid.fl"):
        with contextlib.suppress(OSError, ValueError, psutil.Error):
            pid = int((site_dir / name).read_text().strip())
            roots[pid] = psutil.Process(pid)
    marker = str(site_dir)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        # "-m <site_dir>" (client and job processes) or ".../<site>/startup/sub_start.sh" (the restart loop)
        if any(a == marker or a.startswith(marker + os.sep) for a in cmd):
            roots[proc.pid] = proc
    found: dict[int, Any] = {}
    for proc in roots.values():
        with contextlib.suppress(psutil.Error):
            for p in [proc, *proc.children(recursive=True)]:
                found.setdefault(p.pid, p)
    return list(found.values())


def kill_site(site_dir: Path) -> list[int]:
    """SIGKILL the participant's whole process tree (no shutdown message reaches the server: a crash).

    Returns:
        The killed process ids.

    Raises:
        RuntimeError: no process of the site was found, or one survived.
    """
    import psutil

    procs = site_processes(site_dir)
    if not procs:
        raise RuntimeError(f"site-restart drill: no running process found for {site_dir.name} under {site_dir}")
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(procs, timeout=10)
    if alive:
        raise RuntimeError(f"site-restart drill: {site_dir.name} processes {[p.pid for p in alive]} survived SIGKILL")
    return [p.pid for p in procs]


def start_site(site_dir: Path) -> None:
    """Start the participant again with its own provisioned ``startup/start.sh``, as an operator would.

    The venv's interpreter comes first on PATH (the script runs ``python3``), as ``nvflare poc start`` does.
    Output is appended to the participant's POC console log.
    """
    from nvflare.tool.poc.poc_commands import POC_SERVICE_CONSOLE_LOG

    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    with open(site_dir / POC_SERVICE_CONSOLE_LOG, "a", buffering=1) as log:
        log.write(f"\n--- site-restart drill: start.sh {time.asctime()} ---\n")
        subprocess.run(["bash", str(site_dir / "startup" / "start.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
                       check=True, timeout=60)


# ---- watching the job ----------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it.

    Raises:
        TimeoutError: naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise TimeoutError(f"site-restart drill: {what} did not happen within {timeout:.0f}s")


def rounds_recorded(server_dir: Path) -> int:
    """Rounds the server has recorded in ``history.json`` so far (0 while it is missing or being replaced)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        return len(json.loads((server_dir / "history.json").read_text())["rounds"])
    return 0


def train_tasks_received(site_dir: Path, job_id: str) -> int:
    """How many training tasks the site's job process has taken so far, from its FLARE job log."""
    with contextlib.suppress(OSError):
        return (site_dir / job_id / "log.txt").read_text(errors="replace").count("got task assignment: name=train,")
    return 0


def site_connected_since(session: Any, site: str, since: float) -> bool:
    """Whether the server's admin API lists ``site`` with a connection newer than ``since`` (epoch seconds)."""
    info = session.get_system_info()
    return any(c.name == site and (c.last_connect_time or 0) >= since for c in info.client_info)


def checkpoint_next_round(server_dir: Path) -> int:
    """The round a job resumed from the server's checkpoint starts with (0 without a checkpoint)."""
    import torch

    path = server_dir / "checkpoint" / "server_state.pt"
    if not path.is_file():
        return 0
    return int(torch.load(path, weights_only=False)["next_round"])  # written atomically by our controller


def round_started(server_dir: Path, round_num: int) -> bool:
    """Whether the server has recorded and checkpointed every round before ``round_num`` (so it is under way)."""
    return rounds_recorded(server_dir) >= round_num and checkpoint_next_round(server_dir) >= round_num


def _job_done(session: Any, job_id: str) -> str | None:
    status = str(session.get_job_status(job_id) or "")
    return status if status.startswith("FINISHED") else None


# ---- the POC system --------------------------------------------------------------------------------


def _try_session(poc_root: Path) -> tuple[Any, Path] | None:
    """:func:`_admin_session`, or None while the server is not accepting logins yet."""
    try:
        return _admin_session(poc_root)
    except Exception:  # FLARE raises several kinds while the server starts
        return None


def all_sites_connected(session: Any, sites: list[str]) -> bool:
    """Whether the server's admin API lists every one of ``sites`` as registered."""
    return set(sites) <= {c.name for c in session.get_system_info().client_info}


def _admin_session(poc_root: Path) -> tuple[Any, Path]:
    """A session of FLARE's admin API on the POC system, and the provisioned folder."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session
    from nvflare.recipe.poc_env import DEFAULT_ADMIN_USER

    from monai_fl_ext.flare.job import POC_LOGIN_TIMEOUT, poc_prod_dir

    prod = poc_prod_dir(poc_root)
    # one long login rather than short retries: FLARE's clean-up of a timed-out login can hang
    return new_secure_session(DEFAULT_ADMIN_USER, str(prod / DEFAULT_ADMIN_USER), timeout=POC_LOGIN_TIMEOUT), prod


def _submit(env: Any, spec: Any) -> str:
    """Submit the job built from ``spec`` to the running POC system (FLARE's ``PocEnv``); returns its id."""
    from monai_fl_ext.flare.job import FLARE_DIR, build_job

    job = build_job(spec)
    with contextlib.chdir(FLARE_DIR):  # the client script is referenced relative to this folder
        return env._get_session_manager().submit_job(job)


def start_services(env: Any) -> None:
    """Provision and start the POC server and sites, as ``PocEnv.deploy`` does before it submits a job.

    Separate from the submission so the drill can wait until every site has registered: with
    ``min_clients`` below the number of sites, FLARE would otherwise deploy the job to the sites that
    happen to be up already and leave a slow starter out of the whole job.
    """
    from nvflare.tool.poc.poc_commands import _start_poc, prepare_poc_provision

    prepare_poc_provision(clients=env.clients or [], number_of_clients=env.num_clients, workspace=env.poc_workspace,
                          docker_image=None, use_he=False, project_conf_path="", examples_dir=None)
    _start_poc(poc_workspace=env.poc_workspace, gpu_ids=[], excluded=[env.username], services_list=[])


# ---- the drill ----------------------------------------------------------------------------------


def drill_spec(spec: Any, train_timeout: float = 120, wait: float = 10) -> Any:
    """``spec`` with the settings FLARE needs to carry rounds without one site.

    ``min_clients`` one below the number of sites (the job meta's ``min_clients`` also keeps FLARE from
    aborting the job when a participant is deemed dead), a finite ``train_timeout`` and at most ``wait``
    seconds of waiting for the missing site once the others answered. Every round without the site costs
    that wait; it also keeps such a round longer than a restarted site needs to register again (about 9 s
    here), so the handover happens in the round the site came back in.

    Args:
        spec: the job.
        train_timeout: the round's hard cap when ``spec`` has none.
        wait: upper bound on ``wait_time_after_min_received``.

    Returns:
        A copy of ``spec``.
    """
    sites = spec.sites()
    return replace(spec, min_clients=spec.min_clients or len(sites) - 1, train_timeout=spec.train_timeout or train_timeout,
                   wait_time_after_min_received=min(spec.wait_time_after_min_received, wait), cross_site_eval=False)


def run_site_restart_drill(spec: Any, plan: SiteRestartPlan | None = None, timeout: float = 900,
                           keep_workspace: bool = False) -> dict[str, Any]:
    """Kill ``plan.site``'s process tree mid-round in a POC run, start it again, and let it rejoin.

    Args:
        spec: the job (:class:`~monai_fl_ext.flare.job.FederatedJobSpec`), already with the drill's settings
            (:func:`drill_spec`).
        plan: which site, when.
        timeout: seconds allowed for the whole drill.
        keep_workspace: keep the POC workspace (participants' logs) afterwards.

    Returns:
        The events: ``jobs`` (id and final status of the interrupted and the resumed job), ``killed``
        (round, seconds since start, pids), ``restarted`` (round, seconds), ``registered`` (seconds),
        ``handover`` (rounds recorded when the first job was aborted, the round the resumed job began with),
        ``wall_s``.

    Raises:
        RuntimeError: the resumed job did not finish ``FINISHED:COMPLETED``, the kill came too late in its round, or
            the first job finished its last round before the handover.
        TimeoutError: a step of the drill did not happen in time (the message names it, the site and the round).
    """
    plan = plan or SiteRestartPlan()
    plan.validate(spec.sites(), spec.num_rounds)
    server_dir = Path(spec.output_dir) / "server"
    start = time.monotonic()
    deadline = start + timeout
    left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
    events: dict[str, Any] = {"plan": asdict(plan), "jobs": []}
    from monai_fl_ext.flare.job import poc_system

    with poc_system(spec, keep_workspace) as (env, poc_root):
        start_services(env)
        session, prod = wait_for(lambda: _try_session(poc_root), 180, "the POC server to accept the admin login")
        site_dir = prod / plan.site
        try:
            wait_for(lambda: all_sites_connected(session, spec.sites()), min(180.0, left()), f"all sites {spec.sites()} to register")
            first = _submit(env, spec)
            events["jobs"].append({"job_id": first, "resume": False})
            k = plan.kill_round
            wait_for(lambda: rounds_recorded(server_dir) >= k and train_tasks_received(site_dir, first) > k, left(),
                     f"{plan.site} to receive its training task of round {k}")
            time.sleep(plan.kill_delay)  # into local training (a round takes seconds even on the tiny cohort)
            if rounds_recorded(server_dir) != k:
                raise RuntimeError(f"site-restart drill: round {k} ended within {plan.kill_delay}s, before {plan.site} could be "
                                   "killed in it; lower kill_delay")
            events["killed"] = {"round": k, "at_s": round(time.monotonic() - start, 1), "pids": kill_site(site_dir)}
            back = k + plan.restart_after_rounds
            wait_for(lambda: round_started(server_dir, back), left(), f"round {back} to start without {plan.site}")
            restarted_at = time.time()
            start_site(site_dir)
            events["restarted"] = {"round": back, "at_s": round(time.monotonic() - start, 1)}
            registered = lambda: site_connected_since(session, plan.site, restarted_at)  # noqa: E731
            handover = back
            if plan.observe_rounds:
                wait_for(registered, min(120.0, left()), f"{plan.site} to register again after its restart in round {back}")
                events["registered"] = {"at_s": round(time.monotonic() - start, 1)}
                handover = rounds_recorded(server_dir) + 1 + plan.observe_rounds
                if handover >= spec.num_rounds:
                    raise RuntimeError(f"site-restart drill: {plan.site} registered again in round {handover - 1 - plan.observe_rounds}, too late "
                                       f"to observe {plan.observe_rounds} round(s) and still rejoin within {spec.num_rounds} rounds; plan more rounds")
                wait_for(lambda: round_started(server_dir, handover), left(), f"round {handover} to start (handover)")
            # FLARE cannot restart the site's job process: the job is aborted as a round begins (its predecessor
            # checkpointed) and continued by a resumed job that is deployed to the restarted site too
            session.abort_job(first)
            events["handover"] = {"round": handover, "at_s": round(time.monotonic() - start, 1)}
            events["jobs"][0]["status"] = wait_for(lambda: _job_done(session, first), min(120.0, left()), f"job {first} to end after abort")
            if not plan.observe_rounds:
                wait_for(registered, min(120.0, left()), f"{plan.site} to register again after its restart in round {back}")
                events["registered"] = {"at_s": round(time.monotonic() - start, 1)}
            events["handover"]["resume_round"] = resume_round = checkpoint_next_round(server_dir)
            if resume_round >= spec.num_rounds:
                raise RuntimeError(f"site-restart drill: job {first} completed round {resume_round - 1}, the last, before the handover, "
                                   f"so {plan.site} cannot rejoin; plan more rounds")
            second = _submit(env, replace(spec, resume=True))
            events["jobs"].append({"job_id": second, "resume": True})
            events["jobs"][1]["status"] = wait_for(lambda: _job_done(session, second), left(), f"resumed job {second} to finish")
        finally:
            session.close()
    events["wall_s"] = round(time.monotonic() - start, 1)
    if "COMPLETED" not in events["jobs"][-1].get("status", ""):
        raise RuntimeError(f"site-restart drill: resumed job ended with status {events['jobs'][-1].get('status')}")
    return events

