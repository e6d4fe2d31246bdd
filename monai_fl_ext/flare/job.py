"""Declare a federated bundle job in a few lines and run it: simulation, POC, or an exported job folder.

Sites are the partition's sites; each gets its own datalist. The server's initial model is the
bundle's ``network_def``; the server workflow is :class:`~monai_fl_ext.flare.controller.FederatedBundleController`;
each site runs :mod:`monai_fl_ext.flare.client` through FLARE's ``ScriptRunner``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from monai_fl_ext.algorithms import ALGORITHMS
from monai_fl_ext.bundle import resolve_bundle
from monai_fl_ext.errors import InputError
from monai_fl_ext.partition import load_manifest
from monai_fl_ext.site_checks import software_versions

QUANTIZATIONS = ("float16", "blockwise8", "float4", "normfloat4")
CLIENT_SCRIPT = "client.py"  # relative: FLARE then runs the copy inside the job's custom/ folder
FLARE_DIR = Path(__file__).resolve().parent
POC_LOGIN_TIMEOUT = 120.0  # seconds for the POC server to accept the admin login


@dataclass
class FederatedJobSpec:
    """Everything that defines a federated run of a bundle.

    Args:
        bundle: bundle name under ``bundles/`` or a path.
        dataset_dir: folder the datalists' image paths are relative to (same path at every site in simulation/POC).
        partition_dir: partition folder (``manifest.json`` + ``site-K.json``); its sites are the job's sites.
        output_dir: where the server's history, plots, checkpoints and the sites' outputs go.
        algorithm: ``fedavg``, ``fedprox``, ``scaffold`` or ``fedopt``.
        num_rounds: federated rounds.
        local_epochs: local epochs per round at every site.
        min_clients: fewest answers a round needs (default: all sites).
        fedprox_mu: FedProx proximal weight.
        server_optimizer, server_lr, server_momentum: FedOpt settings.
        weighting: ``steps`` | ``samples`` | ``uniform``; ``site_weights`` multiplies per site.
        train_timeout: hard cap in seconds on a round (0: none); ``wait_time_after_min_received`` after the minimum.
        overrides: bundle config overrides for every site (e.g. ``{"spatial_size": [64, 64]}``).
        cross_site_eval: evaluate final global and local models on every site.
        faults: a fault plan for drills and stress tests (:class:`~monai_fl_ext.faults.FaultPlan` as a dict, e.g.
            ``{"seed": 0, "sites": {"site-2": {"fail_rounds": [1]}, "*": {"delay": [0, 5], "dropout": 0.3}}}``).
        data_policy: a site's bad datalist items: ``fail`` (the site reports the problem and sits out) or ``skip``.
        check_images: sites decode every image before joining.
        aggregator: ``mean`` (weighted), ``median``, ``trimmed_mean`` or ``norm_clip`` (:mod:`monai_fl_ext.robust`).
        trim_fraction: ``trimmed_mean``: fraction of sites dropped at each end per coordinate.
        max_update_norm: reject a site's update whose L2 norm exceeds this (None: no absolute bound).
        max_norm_factor: reject an update whose norm exceeds this many times the median of the other sites' (0: off).
        version_policy: a site whose bundle or package versions differ from the job's: ``refuse``, ``warn`` or ``ignore``.
        clients_per_round: sites sampled each round: a count (>= 1) or a fraction (< 1); None: all. Sites that
            failed recently are less likely to be drawn.
        resume: continue from the server checkpoint an interrupted run of this job left under ``output_dir`` (sites keep
            their privacy accountants in their own folders, so epsilon continues too).
        site_threads: torch CPU threads per site; default: the machine's cores shared among the sites, since
            simulation and POC run every site on this machine (set it to 0 for torch's default at real sites).
        quantization: FLARE's update quantisation both ways (``float16``, ``blockwise8``, ``float4``,
            ``normfloat4``); None sends float32.
        privacy: DP-SGD at every site, as :class:`~monai_fl_ext.privacy.DPSettings` fields (e.g.
            ``{"target_epsilon": 8.0}``); the bundle is switched to ``norm=group``.
        client_dp: client-level DP-FedAvg at the server: ``{"clip": C, "noise_multiplier": z, "delta": d}``.
        initial_checkpoint: start the global model from this checkpoint (a bundle's ``models/model.pt``, plain or
            ``{"model": ...}``, Opacus' ``_module.`` prefix ignored) instead of the bundle's seeded initialisation:
            e.g. a model pretrained on public data, which DP fine-tuning then adapts (docs/privacy.md). It must fit
            the network built with ``overrides``; the job carries a copy of its weights.
        secure_aggregation: aggregate by pairwise masking (:class:`~monai_fl_ext.flare.secure.SecureAggregateController`):
            ``{}`` for the defaults, or settings ``bits``, ``clip_range``, ``max_weight``, ``threshold``,
            ``report_counts``; None aggregates in the clear.
        name: job name.
    """

    bundle: str
    dataset_dir: str
    partition_dir: str
    output_dir: str
    algorithm: str = "fedavg"
    num_rounds: int = 3
    local_epochs: int = 1
    min_clients: int | None = None
    fedprox_mu: float = 0.01
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.6
    weighting: str = "steps"
    site_weights: dict[str, float] = field(default_factory=dict)
    train_timeout: float = 0
    wait_time_after_min_received: float = 30
    overrides: dict[str, Any] = field(default_factory=dict)
    cross_site_eval: bool = True
    faults: dict[str, Any] | None = None
    data_policy: str = "fail"
    check_images: bool = False
    aggregator: str = "mean"
    trim_fraction: float = 0.1
    max_update_norm: float | None = None
    max_norm_factor: float = 100.0
    version_policy: str = "refuse"
    clients_per_round: float | None = None
    resume: bool = False
    site_threads: int | None = None
    quantization: str | None = None
    privacy: dict[str, Any] | None = None
    client_dp: dict[str, float] | None = None
    secure_aggregation: dict[str, Any] | None = None
    initial_checkpoint: str | None = None
    name: str = "monai_fl_ext"

    def __post_init__(self) -> None:
        # absolute from the start: the job is built and run from other working directories
        for name in ("dataset_dir", "partition_dir", "output_dir", "initial_checkpoint"):
            if getattr(self, name) is not None:
                setattr(self, name, str(Path(getattr(self, name)).resolve()))

    def sites(self) -> list[str]:
        return [s["name"] for s in load_manifest(self.partition_dir)["sites"]]

    def validate(self) -> None:
        """Raise :class:`InputError` naming the first bad parameter."""
        if self.algorithm not in ALGORITHMS:
            raise InputError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        sites = self.sites()
        for name, ok in {"num_rounds": self.num_rounds >= 1, "local_epochs": self.local_epochs >= 1,
                         "fedprox_mu": self.fedprox_mu >= 0, "server_lr": self.server_lr > 0,
                         "train_timeout": self.train_timeout >= 0}.items():
            if not ok:
                raise InputError(f"invalid {name}={getattr(self, name)!r}")
        if self.min_clients is not None and not 1 <= self.min_clients <= len(sites):
            raise InputError(f"min_clients={self.min_clients} must be between 1 and the {len(sites)} sites of {self.partition_dir}")
        unknown = set(self.site_weights) - set(sites)
        if unknown:
            raise InputError(f"site_weights names unknown site(s) {sorted(unknown)}; sites are {sites}")
        bad = {s: w for s, w in self.site_weights.items() if not w > 0}
        if bad:
            raise InputError(f"site_weights must be positive, got {bad}")
        if self.privacy is not None:
            from monai_fl_ext.privacy import DPSettings

            DPSettings.from_dict(dict(self.privacy), where="job")
            if self.overrides.get("norm", "group") != "group":
                raise InputError(f"DP-SGD needs the bundle override norm=group (Opacus rejects BatchNorm), got norm={self.overrides['norm']!r}")
            self.overrides = {**self.overrides, "norm": "group"}
        if self.client_dp is not None:
            unknown = set(self.client_dp) - {"clip", "noise_multiplier", "delta"}
            if unknown or not self.client_dp.get("clip", 0) > 0 or self.client_dp.get("noise_multiplier", 0) < 0:
                raise InputError(f"client_dp needs clip > 0 and noise_multiplier >= 0 (keys clip, noise_multiplier, delta), got {self.client_dp}")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise InputError(f"quantization must be one of {QUANTIZATIONS} or None, got {self.quantization!r}")
        if self.quantization not in (None, "float16"):
            import torch

            if not torch.cuda.is_available():  # FLARE's quantiser runs bitsandbytes' blockwise kernels on CUDA only
                raise InputError(f"quantization={self.quantization!r} needs a CUDA build of torch and a GPU; use float16 on CPU")
        if self.secure_aggregation is not None:
            self._validate_secure_aggregation(sites)
        self._validate_robustness(sites)
        if self.initial_checkpoint is not None:
            self.initial_state()
        if not Path(self.dataset_dir).is_dir():
            raise InputError(f"dataset_dir {self.dataset_dir} is not a folder")


    def initial_state(self) -> dict[str, Any]:
        """The weights of ``initial_checkpoint``, checked against the bundle's network with ``overrides``.

        Raises:
            InputError: the file is missing or unreadable, or its keys or shapes differ from the network's.
        """
        from monai_fl_ext.bundle import check_state_matches, load_state
        from monai_fl_ext.flare.network import build_bundle_network

        state = load_state(self.initial_checkpoint)
        network = build_bundle_network(str(resolve_bundle(self.bundle)), self.overrides)
        check_state_matches(state, network, f"initial_checkpoint {self.initial_checkpoint}")
        return state

    def _validate_robustness(self, sites: list[str]) -> None:
        from monai_fl_ext.faults import FaultPlan
        from monai_fl_ext.robust import AGGREGATORS
        from monai_fl_ext.site_checks import DATA_POLICIES, VERSION_POLICIES

        choices = {"aggregator": AGGREGATORS, "data_policy": DATA_POLICIES, "version_policy": VERSION_POLICIES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.aggregator != "mean" and (self.secure_aggregation is not None or self.client_dp is not None):
            raise InputError(f"aggregator={self.aggregator!r} needs each site's update at the server; it cannot be combined "
                             "with secure aggregation or client-level DP (use the sites' norm bound instead)")
        if not 0 <= self.trim_fraction < 0.5 or self.max_norm_factor < 0 or (self.max_update_norm is not None and not self.max_update_norm > 0):
            raise InputError(f"need 0 <= trim_fraction < 0.5, max_norm_factor >= 0 and max_update_norm > 0, got "
                             f"{self.trim_fraction}, {self.max_norm_factor}, {self.max_update_norm}")
        if self.clients_per_round is not None and not (0 < self.clients_per_round < 1 or 1 <= self.clients_per_round <= len(sites)):
            raise InputError(f"clients_per_round must be a fraction in (0, 1) or a count in [1, {len(sites)}], got {self.clients_per_round}")
        if self.faults is not None:
            plan = FaultPlan.from_dict(dict(self.faults))
            unknown = set(plan.sites) - set(sites) - {"*"}
            if unknown:
                raise InputError(f"fault plan names unknown site(s) {sorted(unknown)}; sites are {sites}")

    def _validate_secure_aggregation(self, sites: list[str]) -> None:
        from monai_fl_ext.flare.secure import SETTINGS
        from monai_fl_ext.secagg import FixedPoint, default_threshold

        settings = dict(self.secure_aggregation)
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise InputError(f"unknown secure_aggregation settings {sorted(unknown)}; known: {list(SETTINGS)}")
        clash = {"algorithm=scaffold": self.algorithm == "scaffold", "client_dp": self.client_dp is not None,
                 "quantization": self.quantization is not None}
        if any(clash.values()):
            raise InputError(f"secure aggregation cannot be combined with {[k for k, v in clash.items() if v]}: "
                             "the server would need each site's individual update (or, for quantization, would alter the masked ring values)")
        if len(sites) < 2:
            raise InputError(f"secure aggregation needs at least 2 sites; {self.partition_dir} has {len(sites)}")
        threshold = settings.get("threshold") or default_threshold(len(sites))
        if not 2 <= threshold <= len(sites):
            raise InputError(f"secure_aggregation threshold must be between 2 and the {len(sites)} sites, got {threshold}")
        try:
            FixedPoint(len(sites), **{k: settings[k] for k in ("bits", "clip_range", "max_weight") if k in settings})
        except (TypeError, ValueError) as e:
            raise InputError(f"secure_aggregation: {e}") from e


def _client_args(spec: FederatedJobSpec, bundle_root: Path, site: str, shared_machine: bool) -> str:
    args = ["--bundle", str(bundle_root), "--dataset-dir", str(Path(spec.dataset_dir).resolve()),
            "--datalist", str((Path(spec.partition_dir) / f"{site}.json").resolve()),
            "--run-dir", str((Path(spec.output_dir) / "sites" / site).resolve()),
            "--local-epochs", str(spec.local_epochs), "--algorithm", spec.algorithm, "--fedprox-mu", str(spec.fedprox_mu)]
    for key, value in spec.overrides.items():
        args += ["--override", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    if spec.privacy:
        args += ["--privacy", json.dumps(spec.privacy, separators=(",", ":"), sort_keys=True)]
    if spec.faults:
        from monai_fl_ext.faults import FaultPlan

        site_faults = FaultPlan.from_dict(dict(spec.faults)).site_json(site)
        if site_faults:
            args += ["--faults", site_faults]
    args += ["--data-policy", spec.data_policy] + (["--check-images"] if spec.check_images else [])
    threads = spec.site_threads
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // len(spec.sites())) if shared_machine else 0
    if threads:
        args += ["--threads", str(threads)]
    spaced = [a for a in args if any(c.isspace() for c in a)]
    if spaced:  # FLARE splits script arguments on whitespace and does not honour quotes
        raise InputError(f"paths and overrides must not contain whitespace for FLARE's script runner: {spaced}")
    return " ".join(args)


def build_job(spec: FederatedJobSpec, shared_machine: bool = True):
    """The FLARE job (a ``BaseFedJob``) for ``spec``; see :func:`run_simulation`, :func:`run_poc`, :func:`export_job`.

    Args:
        spec: the job.
        shared_machine: every site runs on this machine (simulation, POC), so CPU threads are shared out.
    """
    from nvflare.app_opt.pt.job_config.base_fed_job import BaseFedJob
    from nvflare.app_opt.pt.job_config.model import PTModel
    from nvflare.job_config.script_runner import ScriptRunner

    from monai_fl_ext.flare.controller import KEY_METRIC, FederatedBundleController
    from monai_fl_ext.flare.network import BundleModelPersistor, bundle_model_spec

    spec.validate()
    bundle_root = resolve_bundle(spec.bundle)
    sites = spec.sites()
    min_clients = spec.min_clients or len(sites)
    # FLARE's own model selector watches the same metric (its default, accuracy, warned for every site each round)
    job = BaseFedJob(name=spec.name, min_clients=min_clients, key_metric=KEY_METRIC)
    initial = None
    if spec.initial_checkpoint is not None:  # the job carries the weights (server custom/), so an exported job does too
        initial = _initial_weights_file(spec)
        job.add_file_to_server(str(initial))  # by base name into custom/ (to_server would keep a sys.path-relative folder)
    job.to_server(PTModel(model=bundle_model_spec(str(bundle_root), spec.overrides),
                          persistor=BundleModelPersistor(str(bundle_root), spec.overrides,
                                                         source_ckpt_file_full_name=initial.name if initial else None)))
    controller = FederatedBundleController
    extra: dict[str, Any] = {}
    if spec.secure_aggregation is not None:
        from monai_fl_ext.flare.secure import SecureAggregateController

        controller, extra = SecureAggregateController, {"secure_aggregation": dict(spec.secure_aggregation)}
    job.to_server(controller(
        **extra,
        num_rounds=spec.num_rounds, min_clients=min_clients, algorithm=spec.algorithm, fedprox_mu=spec.fedprox_mu,
        server_optimizer=spec.server_optimizer, server_lr=spec.server_lr, server_momentum=spec.server_momentum,
        weighting=spec.weighting, site_weights=spec.site_weights, train_timeout=spec.train_timeout,
        wait_time_after_min_received=spec.wait_time_after_min_received, cross_site_eval=spec.cross_site_eval,
        output_dir=str((Path(spec.output_dir) / "server").resolve()),
        client_dp_clip=float((spec.client_dp or {}).get("clip", 0.0)),
        client_dp_noise=float((spec.client_dp or {}).get("noise_multiplier", 0.0)),
        client_dp_delta=float((spec.client_dp or {}).get("delta", 1e-5)),
        aggregator=spec.aggregator, trim_fraction=spec.trim_fraction, max_update_norm=spec.max_update_norm,
        max_norm_factor=spec.max_norm_factor, version_policy=spec.version_policy, clients_per_round=spec.clients_per_round,
        expected_versions=software_versions(bundle_root), resume=spec.resume,
        # simulation and POC workspaces are recreated on every run; the signing key must outlive them for a
        # resumed job to continue its trail (a production server keeps it in its workspace root, the default)
        audit_key_path=str(Path(spec.output_dir).resolve() / "server_keys" / "audit_signing_key.pem") if shared_machine else "",
        crash_after_round=(spec.faults or {}).get("server_crash_after_round"),
    ))
    # The spec travels with the job as a record, in the server app's custom/ folder. That folder makes the
    # server app "bring your own code", which FLARE's class allow-list exempts (POC); a production site that
    # forbids BYOC lists "monai_fl_ext." in class_allow_list of its resources.json instead.
    job.add_file_to_server(str(_record_spec(spec)))
    with contextlib.chdir(FLARE_DIR):
        for site in sites:
            job.to(ScriptRunner(script=CLIENT_SCRIPT, script_args=_client_args(spec, bundle_root, site, shared_machine)), site)
    if spec.quantization:
        _add_quantization(job, spec.quantization, sites)
    job.set_app_packages(["monai_fl_ext"])  # installed at every site; never copied into custom/
    return job


def _add_quantization(job: Any, quantization: str, sites: list[str]) -> None:
    """FLARE's quantiser on every model that leaves a party and its dequantiser where it arrives (train task)."""
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.job_config.defs import FilterType

    from monai_fl_ext.flare.payload import PayloadMeter

    job.to_server(ModelQuantizer(quantization_type=quantization), filter_type=FilterType.TASK_DATA, tasks=["train"])
    job.to_server(PayloadMeter(), filter_type=FilterType.TASK_RESULT, tasks=["train"])  # before dequantising: wire size
    job.to_server(ModelDequantizer(), filter_type=FilterType.TASK_RESULT, tasks=["train"])
    for site in sites:
        job.to(ModelDequantizer(), site, filter_type=FilterType.TASK_DATA, tasks=["train"])
        job.to(ModelQuantizer(quantization_type=quantization), site, filter_type=FilterType.TASK_RESULT, tasks=["train"])


def _initial_weights_file(spec: FederatedJobSpec) -> Path:
    """``initial_checkpoint``'s weights as a plain state dict (no prefix, tensors only) under the output folder."""
    import io

    import torch

    from monai_fl_ext.io import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in spec.initial_state().items()}, buffer)
    return atomic_write_bytes((Path(spec.output_dir) / "initial_model.pt").resolve(), buffer.getvalue())


def _record_spec(spec: FederatedJobSpec) -> Path:
    from monai_fl_ext.io import atomic_write_json

    return atomic_write_json((Path(spec.output_dir) / "job_spec.json").resolve(), asdict(spec))


@contextlib.contextmanager
def round_progress(spec: FederatedJobSpec, enabled: bool = True):
    """A progress bar over federated rounds, fed by the server's ``history.json`` while the job runs elsewhere."""
    import threading

    from tqdm import tqdm

    if not enabled:
        yield
        return
    history = Path(spec.output_dir) / "server" / "history.json"
    done = threading.Event()
    bar = tqdm(total=spec.num_rounds, desc=f"FL rounds ({spec.algorithm}, {len(spec.sites())} sites)", unit="round")

    def poll() -> None:
        while not done.wait(2.0):
            with contextlib.suppress(Exception):
                rounds = json.loads(history.read_text())["rounds"]
                bar.n = len(rounds)
                last = rounds[-1] if rounds else None
                if last:
                    bar.set_postfix(sites=len(last["sites_ok"]), val_auc=last["global_metrics"].get("val_auc"))
                bar.refresh()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()


def run_simulation(spec: FederatedJobSpec, workspace: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Run the job in FLARE's simulator (server thread, one process per site) and return the server output folder."""
    job = build_job(spec)
    workspace = Path(workspace or Path(spec.output_dir) / "flare_workspace").resolve()
    with contextlib.chdir(FLARE_DIR), round_progress(spec, progress):
        job.simulator_run(str(workspace), clients=spec.sites(), threads=len(spec.sites()), log_config="concise")
    server = Path(spec.output_dir) / "server"
    _check_finished(server, workspace / "server" / "log.txt")
    return server


def _check_finished(server: Path, log: Path) -> None:
    """Raise when the server workflow did not reach an end (it raised, or its process was killed, e.g. out of memory)."""
    history = server / "history.json"
    status = json.loads(history.read_text()).get("status") if history.is_file() else None
    if status in (None, "running"):
        raise RuntimeError(f"the federated job ended without finishing (history status {status!r}); the server "
                           f"workflow failed or its process was killed: see {log}")


def export_job(spec: FederatedJobSpec, job_root: str | os.PathLike) -> Path:
    """Write the job folder that ``nvflare job submit`` and ``nvflare simulator`` accept; returns its path.

    Paths in it (bundle, dataset, datalists, outputs) are this machine's; a production deployment
    builds the spec with each site's own paths (see docs/federated.md).
    """
    job_root = Path(job_root).resolve()
    job = build_job(spec, shared_machine=False)
    with contextlib.chdir(FLARE_DIR):
        job.export_job(str(job_root))
    return job_root / spec.name


@contextlib.contextmanager
def poc_system(spec: FederatedJobSpec, keep_workspace: bool = False):
    """FLARE's ``PocEnv`` for ``spec``'s sites under ``output_dir/poc_workspace``; everything stopped afterwards.

    On exit the services are stopped, any process left under a participant's folder is killed (e.g. a site a
    drill started again), FLARE's job store under ``/tmp/nvflare`` is removed if this run created it, and the
    workspace is removed unless ``keep_workspace`` (for its logs).

    Yields:
        ``(PocEnv, POC workspace root)``.
    """
    from nvflare.recipe import PocEnv

    poc_root = (Path(spec.output_dir) / "poc_workspace").resolve()
    storage = [Path("/tmp/nvflare") / d for d in ("jobs-storage", "snapshot-storage")]
    preexisting = {p for p in storage if p.exists()}
    old_env = os.environ.get("NVFLARE_POC_WORKSPACE")
    os.environ["NVFLARE_POC_WORKSPACE"] = str(poc_root)
    # FLARE's default 10 s admin login can pass before a loaded machine's new server accepts logins, and its
    # clean-up of that failed session can hang (FLARE 2.9, ConnManager.stop); give the server time instead
    env = PocEnv(num_clients=len(spec.sites()), clients=spec.sites(), extra={"login_timeout": POC_LOGIN_TIMEOUT})
    try:
        yield env, poc_root
    finally:
        with contextlib.suppress(Exception):
            env.stop(clean_up=False)
        _kill_leftovers(poc_root, spec.sites())
        if not keep_workspace:
            shutil.rmtree(poc_root, ignore_errors=True)
        for path in storage:
            if path not in preexisting:
                shutil.rmtree(path, ignore_errors=True)
        if old_env is None:
            os.environ.pop("NVFLARE_POC_WORKSPACE", None)
        else:
            os.environ["NVFLARE_POC_WORKSPACE"] = old_env


def poc_prod_dir(poc_root: Path) -> Path:
    """The provisioned folder of a POC workspace (one subfolder per participant, as FLARE's ``nvflare poc`` lays it out)."""
    from nvflare.tool.poc.poc_commands import get_prod_dir, setup_service_config

    project, _ = setup_service_config(str(poc_root))
    return Path(get_prod_dir(str(poc_root), project.get("name")))


def _kill_leftovers(poc_root: Path, sites: list[str]) -> None:
    """SIGKILL whatever still runs under a participant's folder of this POC workspace (only this run's processes)."""
    from monai_fl_ext.flare.site_restart import kill_site

    try:
        prod = poc_prod_dir(poc_root)
    except Exception:  # never provisioned (the run failed before FLARE set it up): nothing can run there
        return
    for site in sites:
        with contextlib.suppress(RuntimeError):  # RuntimeError: nothing left of that site, as expected
            kill_site(prod / site)


def run_poc(spec: FederatedJobSpec, timeout: float = 1800, keep_workspace: bool = False, progress: bool = True) -> Path:
    """Run the job in FLARE's POC mode: a provisioned server and one process per site over TLS on loopback.

    The POC workspace lives under ``output_dir/poc_workspace``; the services are stopped and the
    workspace removed (unless ``keep_workspace``, for its logs) when the job ends or fails, so no
    process is left behind (:func:`poc_system`).

    Returns:
        The server output folder.

    Raises:
        RuntimeError: the job did not finish with status ``FINISHED:COMPLETED``.
    """
    from nvflare.recipe.spec import Recipe

    class _JobRecipe(Recipe):
        """FLARE's Recipe API around a job we built ourselves (Recipe has no abstract methods)."""

    job = build_job(spec)
    status = None
    with poc_system(spec, keep_workspace) as (env, _):
        with contextlib.chdir(FLARE_DIR):
            run = _JobRecipe(job).execute(env)
        with round_progress(spec, progress):
            run.get_result(timeout=timeout, clean_up=False)
        status = run.get_status()
    if status is None or "COMPLETED" not in str(status):
        raise RuntimeError(f"POC job {spec.name} ended with status {status}")
    return Path(spec.output_dir) / "server"
