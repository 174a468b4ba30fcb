"""Sharded audits over torch.distributed: each rank attacks its share of the samples, all ranks see all results.

torchrun (`torchrun --nproc_per_node N -m robustlab audit ...`) starts N copies of the same command and
sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR. The CLI calls `start()`, which joins the process
group (gloo on CPU, nccl on GPU, each rank on cuda:LOCAL_RANK). From then on every attack call
(attacks.base.Attack.__call__) runs `run_parts`: rank r attacks a contiguous block of the call's
batches (exactly the batches a one-process run with the same batch size makes: float results of a
forward pass depend on the batch they are computed in) and the blocks are all-gathered in rank order, so every rank holds the whole outcome and
runs the same code after it (cascade members, checks, worst case, verdicts) on the same numbers.
Because every random draw is seeded per sample and results do not depend on batch composition
(robustlab.seeding, robustlab.batching), the gathered outcome equals a one-process run's bit for bit.
Only rank 0 writes (results, report, journal); the others compute and stay quiet.

The Python API works the same under a process group the caller initialised: `robustlab.audit`
shards whenever torch.distributed is initialised with more than one rank.

Tensors travel as raw bytes (any dtype, through gloo or nccl alike); nothing is pickled.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from robustlab.log import get_logger

_log = get_logger(__name__)
# Sharding is on only inside an audit (robustlab.harness) and only for the outermost attack call: an
# attack called by another attack's batch, or by DDP adversarial training (each rank its own batch),
# runs on the caller's samples as given.
_IDLE_SAID: list[bool] = []  # the hint about idle ranks, once per process
_SHARDING: contextvars.ContextVar[bool] = contextvars.ContextVar("robustlab_sharding", default=False)


@dataclass(frozen=True)
class Group:
    """The process group an audit is sharded over."""

    rank: int
    world: int
    device: torch.device  # where collectives run: CPU for gloo, this rank's GPU for nccl

    def block(self, n: int, batch: int = 1, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of rank's contiguous share of n samples, in whole batches of `batch` (the batches a
        one-process run would make: the first ranks get one batch more where they do not divide evenly)."""
        r = self.rank if rank is None else rank
        batches = -(-n // max(1, batch))
        size, extra = divmod(batches, self.world)
        first = r * size + min(r, extra)
        last = first + size + (1 if r < extra else 0)
        return min(n, first * batch), min(n, last * batch)


def current() -> Group | None:
    """The active group, or None for a one-process run (no process group, or one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world < 2:
        return None
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(rank=dist.get_rank(), world=world, device=device)


def is_main() -> bool:
    """True on rank 0 (or without a group): the process that writes results, journal and report."""
    group = current()
    return group is None or group.rank == 0


def launched() -> bool:
    """True when torchrun (or any launcher following its environment contract) started more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: str | torch.device) -> str | torch.device:
    """The device a rank audits on: with "auto" under a launcher and GPUs, this rank's own (LOCAL_RANK)."""
    if launched() and str(device) in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return device


def start(device: torch.device) -> Group | None:
    """Join torchrun's process group (env:// rendezvous) when launched with several ranks; None otherwise."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    if not dist.is_available():
        from robustlab.errors import InputError

        raise InputError("torchrun", "this PyTorch build has no torch.distributed; run one process instead")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    group = current()
    _log.debug("sharded audit: rank %d of %d (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return group


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- sharded work
@contextlib.contextmanager
def sharding() -> Iterator[Group | None]:
    """Attack calls inside the block are sharded over the active group (if any)."""
    token = _SHARDING.set(True)
    try:
        yield current()
    finally:
        _SHARDING.reset(token)


def run_parts(n: int, batch: int, run: Callable[[int, int], list[dict]]) -> list[dict]:
    """run(start, stop) -> per-batch dicts of per-sample CPU tensors (plus int counters), for samples [0, n).

    One process: run(0, n). Sharded: each rank runs its block of whole batches of `batch`, and the blocks' dicts are gathered in
    rank order into one dict per rank (the list a one-process run would give, cut differently).
    Integer counters (gradient_calls) are summed over the ranks' batches as a one-process run sums them."""
    group = current() if _SHARDING.get() else None
    if group is None:
        return run(0, n)
    start, stop = group.block(n, batch)
    batches = -(-n // max(1, batch))
    if batches < group.world and not _IDLE_SAID:
        _IDLE_SAID.append(True)
        _log.info("%d samples make %d batch(es) of %d for %d ranks: some ranks wait; a smaller --batch-size "
                  "shards them (the result then equals a one-process run with that batch size)",
                  n, batches, batch, group.world)
    token = _SHARDING.set(False)  # what this rank's block calls runs on the block as given
    try:
        local = _merge(run(start, stop) if stop > start else [])
    finally:
        _SHARDING.reset(token)
    return [part for part in gather_dicts(group, local) if part]


def _merge(parts: list[dict]) -> dict:
    if not parts:
        return {}
    merged: dict = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        merged[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else sum(values)
    return merged


def gather_dicts(group: Group, local: dict) -> list[dict]:
    """Every rank's dict (same keys and per-sample shapes, any lengths, possibly empty) on every rank.

    The ranks first agree on each field's kind (a number, or a tensor's dtype and trailing shape) from
    the ranks that have samples, so a rank with none makes exactly the same collective calls."""
    layout = ";".join(f"{k}={_kind(v)}" for k, v in sorted(local.items()))
    layouts = _gather_strings(group, layout)
    agreed = next((text for text in layouts if text), "")
    if any(text and text != agreed for text in layouts):
        raise RuntimeError(f"sharded attack: ranks returned different fields {layouts}")
    out: list[dict] = [{} for _ in range(group.world)]
    for field in agreed.split(";") if agreed else []:
        key, kind = field.split("=", 1)
        if kind == "number":
            value = local.get(key, 0)
            counts = _all_gather_fixed(group, torch.tensor([float(value or 0)], dtype=torch.float64))
            for r in range(group.world):
                if layouts[r]:
                    out[r][key] = int(counts[r].item())
            continue
        dtype_name, _, trailing = kind.partition(":")
        dtype = getattr(torch, dtype_name)
        shape = tuple(int(d) for d in trailing.split("x") if d)
        value = local.get(key)
        tensors = gather_tensor(group, value if value is not None else torch.empty((0, *shape), dtype=dtype))
        for r in range(group.world):
            if layouts[r]:
                out[r][key] = tensors[r]
    return out


def _kind(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')}:{'x'.join(str(d) for d in value.shape[1:])}"
    return "number"


def gather_tensor(group: Group, tensor: torch.Tensor) -> list[torch.Tensor]:
    """All ranks' tensors (same dtype and trailing shape, any first dimension), on the CPU, in rank order."""
    tensor = tensor.detach().cpu().contiguous()
    lengths = _all_gather_fixed(group, torch.tensor([tensor.shape[0]], dtype=torch.int64)).reshape(-1).tolist()
    row_bytes = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
    row_bytes = int(_all_gather_fixed(group, torch.tensor([row_bytes], dtype=torch.int64)).max())
    longest = max(int(v) for v in lengths)
    raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.zeros(0, dtype=torch.uint8)
    padded = torch.zeros(longest * row_bytes, dtype=torch.uint8)
    padded[: raw.numel()] = raw
    pieces = _all_gather_fixed(group, padded)
    trailing = tuple(tensor.shape[1:])
    out = []
    for r, length in enumerate(lengths):
        data = pieces[r][: int(length) * row_bytes].clone()
        out.append(data.view(tensor.dtype).reshape((int(length), *trailing)) if length else
                   torch.empty((0, *trailing), dtype=tensor.dtype))
    return out


def _all_gather_fixed(group: Group, tensor: torch.Tensor) -> torch.Tensor:
    """all_gather of same-shape tensors: a (world, *shape) CPU tensor."""
    on = tensor.to(group.device)
    pieces = [torch.empty_like(on) for _ in range(group.world)]
    dist.all_gather(pieces, on)
    return torch.stack([p.cpu() for p in pieces])


def _gather_strings(group: Group, text: str) -> list[str]:
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)
    return [t.numpy().tobytes().decode() for t in gather_tensor(group, data)]


def broadcast_bytes(data: bytes | None) -> bytes | None:
    """Rank 0's bytes (or None) on every rank; without a group, `data` itself."""
    group = current()
    if group is None:
        return data
    size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=group.device)
    dist.broadcast(size, src=0)
    length = int(size.item())
    if length < 0:
        return None
    if length == 0:
        return b""
    buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if group.rank == 0 and data is not None
              else torch.zeros(length, dtype=torch.uint8)).to(group.device)
    dist.broadcast(buffer, src=0)
    return buffer.cpu().numpy().tobytes()


def same_everywhere(flag: bool) -> bool:
    """True only if every rank says True (e.g. all found the journal entry)."""
    group = current()
    if group is None:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=group.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
