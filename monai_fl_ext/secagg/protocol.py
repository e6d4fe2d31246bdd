"""Secure aggregation by pairwise masking with dropout recovery (Bonawitz et al., CCS 2017), one round at a time.

The protocol, for the sites ``U1`` of one round (the server only relays and sums):

1. **Advertise keys.** Each site makes two fresh X25519 key pairs: ``c`` to encrypt shares to its peers
   and ``s`` to agree pairwise mask seeds. The server publishes the directory of public keys.
2. **Share keys.** Each site draws a self-mask seed ``b``, Shamir-shares ``b`` and its ``s`` private key
   t-of-n, encrypts each peer's shares to that peer and commits to ``b``. The senders form ``U2``.
3. **Masked input.** Each site in ``U2`` encodes ``[w, w*x]`` in Z_(2^bits) and adds
   ``PRG(b) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)``; the senders form ``U3``.
4. **Unmask.** Each survivor reveals its shares of ``b_u`` for every ``u`` in ``U3`` and of ``s_u`` for every
   dropped ``u`` in ``U2 \\ U3``, never both for one site. The server reconstructs them (checked against the
   commitment and the advertised public key), removes the self-masks of survivors and the pairwise
   masks that survivors shared with dropped sites, and decodes the weighted mean.

A site that was declared dropped and then arrives late can never be unmasked on its own: its ``b`` was
never revealed. Messages carry the job id and round and are rejected if they do not match; fewer than
``threshold`` sites at any step aborts the round (:class:`SecAggAbort`) with nothing applied.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag

from monai_fl_ext.secagg import crypto
from monai_fl_ext.secagg.fixed_point import FixedPoint

MAX_RECONSTRUCTION_TRIES = 256


class SecAggError(ValueError):
    """A message was rejected; the text names the site and round."""


class SecAggAbort(RuntimeError):
    """The round cannot complete securely; the global model must stay unchanged."""


@dataclass(frozen=True)
class RoundConfig:
    """What every party of one secure aggregation round agrees on (sent by the server in the task meta).

    Args:
        job_id: the FLARE job id; keys and messages are bound to it.
        round: the federated round; keys and messages are bound to it.
        sites: the round's sites ``U1``; share indices follow their sorted order.
        threshold: ``t``: the fewest sites that can finish the round, and the shares needed to reconstruct a secret.
        length: number of update coordinates (the flattened model).
        bits: ring bit width (32 or 64).
        clip_range: update coordinates are clipped to ``[-clip_range, clip_range]``.
        max_weight: the largest aggregation weight a site may send.
    """

    job_id: str
    round: int
    sites: tuple[str, ...]
    threshold: int
    length: int
    bits: int = 32
    clip_range: float = 8.0
    max_weight: float = 4096.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sites", tuple(sorted(self.sites)))
        n = len(self.sites)
        if len(set(self.sites)) != n:
            raise ValueError(f"round {self.round}: duplicate sites in {self.sites}")
        if n < 2:
            raise ValueError(f"round {self.round}: secure aggregation needs at least 2 sites, got {n} "
                             "(with one site the sum is that site's update)")
        if not 2 <= self.threshold <= n:
            raise ValueError(f"round {self.round}: threshold must be between 2 and the {n} sites, got {self.threshold}")
        if self.length < 1:
            raise ValueError(f"round {self.round}: the update length must be positive, got {self.length}")
        self.encoding  # validates bits, clip_range, max_weight

    @property
    def encoding(self) -> FixedPoint:
        return FixedPoint(len(self.sites), self.bits, self.clip_range, self.max_weight)

    def index(self, site: str) -> int:
        """Shamir share index of ``site`` (1-based)."""
        return self.sites.index(site) + 1

    def where(self, site: str) -> str:
        return f"{site}, round {self.round}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RoundConfig":
        return cls(**{**data, "sites": tuple(data["sites"])})


def default_threshold(num_sites: int) -> int:
    """A strict majority (at least 2): survivors must outnumber any coalition the server could claim dropped."""
    return max(2, num_sites // 2 + 1)


def _check_header(config: RoundConfig, site: str, msg: dict[str, Any], stage: str) -> None:
    if site not in config.sites:
        raise SecAggError(f"{config.where(site)}: {stage} from a site that is not in the round's key directory {list(config.sites)}")
    if msg.get("job_id") != config.job_id or msg.get("round") != config.round or msg.get("site") != site:
        raise SecAggError(f"{config.where(site)}: {stage} message is for job {msg.get('job_id')!r}, round {msg.get('round')!r}, "
                          f"site {msg.get('site')!r}; expected job {config.job_id!r}, round {config.round}, site {site!r} "
                          "(replayed or misrouted)")


def _share_key(config: RoundConfig, private: Any, peer_public: bytes, a: str, b: str) -> bytes:
    return crypto.agree(private, peer_public, crypto.context(config.job_id, config.round, "share-key", *sorted((a, b))))


def _pair_seed(config: RoundConfig, private: Any, peer_public: bytes, a: str, b: str) -> bytes:
    return crypto.agree(private, peer_public, crypto.context(config.job_id, config.round, "pair-mask", *sorted((a, b))))


def _self_mask_commitment(config: RoundConfig, site: str, seed: bytes) -> bytes:
    return crypto.commitment(seed, crypto.context(config.job_id, config.round, "self-mask", site))


class SecAggClient:
    """One site's side of one round. Keep the object for the whole round; make a new one each round.

    Args:
        config: the round's configuration.
        site: this site's name.
    """

    def __init__(self, config: RoundConfig, site: str) -> None:
        if site not in config.sites:
            raise SecAggError(f"{config.where(site)}: this site is not among the round's sites {list(config.sites)}")
        self.config, self.site = config, site
        self._c_private, self.c_public = crypto.new_keypair()
        self._s_private, self.s_public = crypto.new_keypair()
        self._self_seed = os.urandom(crypto.KEY_BYTES)
        self._directory: dict[str, dict[str, bytes]] | None = None
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # owner -> (index, share of s, share of b)
        self._u2: list[str] | None = None
        self._revealed: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self.problems: list[str] = []

    def _header(self) -> dict[str, Any]:
        return {"job_id": self.config.job_id, "round": self.config.round, "site": self.site}

    def advertise(self) -> dict[str, Any]:
        """Step 1: the two public keys."""
        return {**self._header(), "c_pk": self.c_public, "s_pk": self.s_public}

    def share_keys(self, directory: dict[str, dict[str, bytes]]) -> dict[str, Any]:
        """Step 2: Shamir shares of ``s`` and ``b`` for every peer in ``directory``, each encrypted to that peer.

        Raises:
            SecAggError: the directory lacks this site or its own keys, names unknown sites, repeats a key,
                or is smaller than the threshold.
        """
        cfg, where = self.config, self.config.where(self.site)
        mine = directory.get(self.site)
        if not mine or mine.get("c_pk") != self.c_public or mine.get("s_pk") != self.s_public:
            raise SecAggError(f"{where}: the key directory does not hold this site's own public keys")
        unknown = set(directory) - set(cfg.sites)
        if unknown:
            raise SecAggError(f"{where}: the key directory names sites outside the round: {sorted(unknown)}")
        if len(directory) < cfg.threshold:
            raise SecAggError(f"{where}: {len(directory)} sites in the key directory, below the threshold {cfg.threshold}")
        keys = [k for entry in directory.values() for k in (entry.get("c_pk"), entry.get("s_pk"))]
        if any(not isinstance(k, bytes) or len(k) != crypto.KEY_BYTES for k in keys) or len(set(keys)) != len(keys):
            raise SecAggError(f"{where}: the key directory holds malformed or repeated public keys")
        self._directory = {s: dict(e) for s, e in directory.items()}
        n, t = len(cfg.sites), cfg.threshold
        s_shares = dict(crypto.split_secret(crypto.private_bytes(self._s_private), t, n))
        b_shares = dict(crypto.split_secret(self._self_seed, t, n))
        sealed = {}
        for peer in sorted(directory):
            idx = cfg.index(peer)
            if peer == self.site:
                self._held[self.site] = (idx, s_shares[idx], b_shares[idx])
                continue
            key = _share_key(cfg, self._c_private, directory[peer]["c_pk"], self.site, peer)
            plaintext = idx.to_bytes(2, "big") + s_shares[idx] + b_shares[idx]
            sealed[peer] = crypto.seal(key, plaintext, crypto.context(cfg.job_id, cfg.round, "share", self.site, peer))
        return {**self._header(), "shares": sealed, "b_commit": _self_mask_commitment(cfg, self.site, self._self_seed)}

    def receive_shares(self, mailbox: dict[str, dict[str, bytes]]) -> None:
        """Keep the shares addressed to this site; the senders are ``U2``, the sites masks are agreed with.

        A share that does not decrypt is recorded in :attr:`problems` and skipped: the others' shares can
        still recover that sender's secrets.

        Raises:
            SecAggError: called before :meth:`share_keys`, this site is not in ``U2``, ``U2`` is below the
                threshold or names a site missing from the directory.
        """
        cfg, where = self.config, self.config.where(self.site)
        if self._directory is None:
            raise SecAggError(f"{where}: shares arrived before this site shared its keys")
        u2 = sorted(mailbox)
        if self.site not in u2 or len(u2) < cfg.threshold or not set(u2) <= set(self._directory):
            raise SecAggError(f"{where}: the share senders {u2} must include this site, reach the threshold "
                              f"{cfg.threshold} and be in the key directory")
        for sender in u2:
            if sender == self.site:
                continue
            sealed = mailbox[sender].get(self.site)
            try:
                if sealed is None:
                    raise InvalidTag
                key = _share_key(cfg, self._c_private, self._directory[sender]["c_pk"], sender, self.site)
                plain = crypto.open_sealed(key, sealed, crypto.context(cfg.job_id, cfg.round, "share", sender, self.site))
                if int.from_bytes(plain[:2], "big") != cfg.index(self.site) or len(plain) != 2 + 2 * crypto.KEY_BYTES:
                    raise InvalidTag
            except (InvalidTag, TypeError, ValueError):
                self.problems.append(f"{where}: the share from {sender} is missing or does not decrypt")
                continue
            self._held[sender] = (cfg.index(self.site), plain[2:34], plain[34:66])
        self._u2 = u2

    def mask(self, update: np.ndarray, weight: float) -> tuple[np.ndarray, dict[str, float]]:
        """Step 3: the masked encoding of ``[w, w * update]`` and what the site may disclose about it.

        Returns:
            ``(masked, info)``: the ring vector to send, and ``info`` with the clipped fraction and the
            pre-masking update norm (statistics of the site's own update it chooses to report).

        Raises:
            SecAggError: before the shares arrived, a wrong update length, or a weight outside the encoding's range.
        """
        cfg, where = self.config, self.config.where(self.site)
        if self._u2 is None:
            raise SecAggError(f"{where}: masking before the share exchange finished")
        update = np.asarray(update).ravel()
        if update.size != cfg.length:
            raise SecAggError(f"{where}: the update has {update.size} coordinates, the round expects {cfg.length}")
        enc = cfg.encoding
        try:
            masked, clipped = enc.encode(update, weight)
        except ValueError as e:
            raise SecAggError(f"{where}: {e}") from e
        masked += crypto.expand_mask(self._self_seed, cfg.length + 1, enc.dtype)
        for peer in self._u2:
            if peer == self.site:
                continue
            mask = crypto.expand_mask(_pair_seed(cfg, self._s_private, self._directory[peer]["s_pk"], self.site, peer),
                                      cfg.length + 1, enc.dtype)
            if self.site < peer:
                masked += mask
            else:
                masked -= mask
        return masked, {"clipped_fraction": clipped, "update_norm": float(np.linalg.norm(update.astype(np.float64)))}

    def unmask(self, survivors: list[str], dropped: list[str]) -> dict[str, Any]:
        """Step 4: shares of ``b`` for survivors and of ``s`` for dropped sites, never both for one site.

        Raises:
            SecAggError: the split is not a partition of ``U2``, lacks this site, is below the threshold, or
                differs from a split this site already answered (a server trying to learn both secrets).
        """
        cfg, where = self.config, self.config.where(self.site)
        survivors, dropped = sorted(survivors), sorted(dropped)
        if self._u2 is None or set(survivors) & set(dropped) or sorted(survivors + dropped) != self._u2:
            raise SecAggError(f"{where}: survivors {survivors} and dropped {dropped} must split the share senders {self._u2}")
        if self.site not in survivors or len(survivors) < cfg.threshold:
            raise SecAggError(f"{where}: unmasking needs this site among at least {cfg.threshold} survivors, got {survivors}")
        split = (tuple(survivors), tuple(dropped))
        if self._revealed is not None and self._revealed != split:
            raise SecAggError(f"{where}: already answered for survivors {list(self._revealed[0])}; "
                              "a second, different request would reveal both secrets of a site")
        self._revealed = split
        b_shares = {u: [self._held[u][0], self._held[u][2]] for u in survivors if u in self._held}
        s_shares = {u: [self._held[u][0], self._held[u][1]] for u in dropped if u in self._held}
        return {**self._header(), "b_shares": b_shares, "s_shares": s_shares}


@dataclass
class AggregateResult:
    """What the server learns from a secure round.

    Args:
        mean: the weighted mean of the survivors' clipped updates (float64, flattened).
        total_weight: the survivors' total aggregation weight.
        contributors: sites whose updates are in the sum.
        dropped: sites that shared keys but sent no masked update in time.
        error_bound: every coordinate of ``mean`` is within this of the exact weighted mean.
        rejected: messages rejected during the round, with the reason (site, round, why).
    """

    mean: np.ndarray
    total_weight: float
    contributors: list[str]
    dropped: list[str]
    error_bound: float
    rejected: list[str] = field(default_factory=list)


class SecAggServer:
    """The server's side of one round: validates and relays messages, then unmasks only the sum.

    Each ``add_*`` raises :class:`SecAggError` for a rejected message and changes nothing; the round goes on
    without that site. Each step that needs the threshold raises :class:`SecAggAbort` when it is not met.

    Args:
        config: the round's configuration.
    """

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self.keys: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, bytes] = {}
        self.sealed: dict[str, dict[str, bytes]] = {}
        self.masked: dict[str, np.ndarray] = {}
        self.revealed: dict[str, dict[str, Any]] = {}
        self.rejected: list[str] = []
        self._split: tuple[list[str], list[str]] | None = None

    def _reject(self, error: SecAggError) -> None:
        self.rejected.append(str(error))
        raise error

    def _need(self, have: list[str] | set[str], stage: str) -> None:
        if len(have) < self.config.threshold:
            raise SecAggAbort(f"round {self.config.round}: {len(have)} site(s) {sorted(have)} at {stage}, "
                              f"below the threshold {self.config.threshold}; the round is aborted")

    def add_keys(self, site: str, msg: dict[str, Any]) -> None:
        """Step 1 message of ``site``."""
        cfg = self.config
        try:
            _check_header(cfg, site, msg, "key advertisement")
            keys = {k: msg.get(k) for k in ("c_pk", "s_pk")}
            if site in self.keys:
                raise SecAggError(f"{cfg.where(site)}: keys advertised twice")
            if any(not isinstance(k, bytes) or len(k) != crypto.KEY_BYTES for k in keys.values()):
                raise SecAggError(f"{cfg.where(site)}: public keys must be {crypto.KEY_BYTES} raw bytes")
            seen = {k for e in self.keys.values() for k in e.values()}
            if seen & set(keys.values()) or keys["c_pk"] == keys["s_pk"]:
                raise SecAggError(f"{cfg.where(site)}: a public key repeats another's")
        except SecAggError as e:
            self._reject(e)
        self.keys[site] = keys

    def directory(self) -> dict[str, dict[str, bytes]]:
        """The key directory for step 2. Raises :class:`SecAggAbort` below the threshold."""
        self._need(self.keys, "key advertisement")
        return {s: dict(k) for s, k in sorted(self.keys.items())}

    def add_shares(self, site: str, msg: dict[str, Any]) -> None:
        """Step 2 message of ``site``: sealed shares for every other site in the directory and its commitment."""
        cfg = self.config
        try:
            _check_header(cfg, site, msg, "key shares")
            if site not in self.keys:
                raise SecAggError(f"{cfg.where(site)}: shares from a site that advertised no keys")
            if site in self.sealed:
                raise SecAggError(f"{cfg.where(site)}: shares sent twice")
            shares, commit = msg.get("shares"), msg.get("b_commit")
            expected = set(self.keys) - {site}
            if not isinstance(shares, dict) or set(shares) != expected or not all(isinstance(v, bytes) for v in shares.values()):
                raise SecAggError(f"{cfg.where(site)}: shares must be sealed bytes for exactly {sorted(expected)}")
            if not isinstance(commit, bytes) or len(commit) != 32:
                raise SecAggError(f"{cfg.where(site)}: the self-mask commitment must be 32 bytes")
        except SecAggError as e:
            self._reject(e)
        self.sealed[site], self.commits[site] = dict(shares), commit

    def mailbox(self) -> dict[str, dict[str, bytes]]:
        """Every sealed share, keyed by sender then recipient (each recipient opens only its own); senders are ``U2``."""
        self._need(self.sealed, "share exchange")
        return {s: dict(v) for s, v in sorted(self.sealed.items())}

    def add_masked(self, site: str, msg: dict[str, Any]) -> None:
        """Step 3 message of ``site``: its masked vector."""
        cfg, enc = self.config, self.config.encoding
        try:
            _check_header(cfg, site, msg, "masked update")
            if site not in self.sealed:
                raise SecAggError(f"{cfg.where(site)}: a masked update from a site that did not share its keys")
            if self._split is not None:
                raise SecAggError(f"{cfg.where(site)}: masked update arrived after unmasking began (declared dropped)")
            if site in self.masked:
                raise SecAggError(f"{cfg.where(site)}: masked update sent twice")
            vec = msg.get("masked")
            if not isinstance(vec, np.ndarray) or vec.dtype != enc.dtype or vec.shape != (cfg.length + 1,):
                got = f"{getattr(vec, 'dtype', type(vec).__name__)} {getattr(vec, 'shape', '')}"
                raise SecAggError(f"{cfg.where(site)}: the masked update must be {enc.dtype} of shape ({cfg.length + 1},), got {got}")
        except SecAggError as e:
            self._reject(e)
        self.masked[site] = vec

    def unmask_request(self) -> dict[str, list[str]]:
        """Step 4 request: who survived and who dropped. Fixed once made; later masked updates are refused."""
        if self._split is None:
            self._need(self.masked, "masked input")
            survivors = sorted(self.masked)
            self._split = (survivors, sorted(set(self.sealed) - set(survivors)))
        return {"survivors": list(self._split[0]), "dropped": list(self._split[1])}

    def add_unmask(self, site: str, msg: dict[str, Any]) -> None:
        """Step 4 message of ``site``: its shares of survivors' ``b`` and dropped sites' ``s``."""
        cfg = self.config
        try:
            _check_header(cfg, site, msg, "unmasking shares")
            if self._split is None or site not in self._split[0]:
                raise SecAggError(f"{cfg.where(site)}: unmasking shares from a site that is not a survivor")
            if site in self.revealed:
                raise SecAggError(f"{cfg.where(site)}: unmasking shares sent twice")
            b, s = msg.get("b_shares"), msg.get("s_shares")
            if not isinstance(b, dict) or not isinstance(s, dict) or not set(b) <= set(self._split[0]) or not set(s) <= set(self._split[1]):
                raise SecAggError(f"{cfg.where(site)}: b shares must be for survivors and s shares for dropped sites only")
            for share in [*b.values(), *s.values()]:
                if (not isinstance(share, (list, tuple)) or len(share) != 2 or share[0] != cfg.index(site)
                        or not isinstance(share[1], bytes) or len(share[1]) != crypto.KEY_BYTES):
                    raise SecAggError(f"{cfg.where(site)}: a share must be [{cfg.index(site)}, {crypto.KEY_BYTES} bytes]")
        except SecAggError as e:
            self._reject(e)
        self.revealed[site] = {"b": dict(b), "s": dict(s)}

    def _reconstruct(self, owner: str, kind: str, check) -> bytes:
        shares = [(r, (int(m[kind][owner][0]), m[kind][owner][1])) for r, m in sorted(self.revealed.items()) if owner in m[kind]]
        self._need([r for r, _ in shares], f"reconstruction of {owner}'s {'self-mask seed' if kind == 'b' else 'mask key'}")
        for tries, subset in enumerate(itertools.combinations(shares, self.config.threshold)):
            if tries >= MAX_RECONSTRUCTION_TRIES:
                break
            secret = crypto.combine_secret([s for _, s in subset])
            if check(secret):
                return secret
        raise SecAggAbort(f"round {self.config.round}: the shares of {owner}'s "
                          f"{'self-mask seed' if kind == 'b' else 'mask key'} from {[r for r, _ in shares]} do not reconstruct "
                          "a value matching its commitment; the round is aborted")

    def aggregate(self) -> AggregateResult:
        """Unmask the sum of the survivors' vectors and decode their weighted mean.

        Raises:
            SecAggAbort: fewer than ``threshold`` survivors answered, or a secret does not reconstruct.
        """
        cfg, enc = self.config, self.config.encoding
        request = self.unmask_request()
        survivors, dropped = request["survivors"], request["dropped"]
        self._need(self.revealed, "unmasking")
        total = np.zeros(cfg.length + 1, dtype=enc.dtype)
        for site in survivors:
            total += self.masked[site]
        for u in survivors:
            seed = self._reconstruct(u, "b", lambda s, u=u: _self_mask_commitment(cfg, u, s) == self.commits[u])
            total -= crypto.expand_mask(seed, cfg.length + 1, enc.dtype)
        for u in dropped:
            raw = self._reconstruct(u, "s", lambda s, u=u: crypto.public_of(s) == self.keys[u]["s_pk"])
            private = crypto.private_from_bytes(raw)
            for v in survivors:  # v added +PRG(s_uv) when v < u and -PRG(s_uv) otherwise: undo it
                mask = crypto.expand_mask(_pair_seed(cfg, private, self.keys[v]["s_pk"], u, v), cfg.length + 1, enc.dtype)
                if v < u:
                    total -= mask
                else:
                    total += mask
        mean, total_w, bound = enc.decode_sum(total, len(survivors))
        return AggregateResult(mean=mean, total_weight=total_w * cfg.max_weight, contributors=survivors, dropped=dropped,
                               error_bound=bound, rejected=list(self.rejected))


def flatten(params: dict[str, Any], keys: list[str]) -> np.ndarray:
    """The float64 concatenation of ``params[k]`` for ``keys``, in that order (the protocol's vector layout)."""
    return np.concatenate([np.asarray(params[k], dtype=np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def unflatten(vector: np.ndarray, template: dict[str, Any], keys: list[str]) -> dict[str, np.ndarray]:
    """Split ``vector`` back into arrays shaped and typed like ``template[k]`` for ``keys``."""
    out, pos = {}, 0
    for k in keys:
        ref = np.asarray(template[k])
        out[k] = vector[pos:pos + ref.size].reshape(ref.shape).astype(ref.dtype)
        pos += ref.size
    if pos != vector.size:
        raise ValueError(f"the vector has {vector.size} values, the layout needs {pos}")
    return out
