"""
How this process was launched, which device and precision it uses, and the one init/cleanup pair for distributed runs.

The same script runs unchanged as
    python train.py ...                               one process
    torchrun --standalone --nproc_per_node=8 ...      torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT
    srun python train.py ...                          Slurm sets SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, ...
    srun torchrun ...                                 torchrun's variables win over Slurm's
An interactive `salloc` shell (or an sbatch script's own shell) with one task runs as a single process.
"""

import contextlib
import os
import re
from dataclasses import dataclass

from configurator import UserError


@dataclass(frozen=True)
class Launch:
    mode: str  # "single", "torchrun" or "slurm"
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_master(self):
        return self.rank == 0


def expand_nodelist(nodelist):
    """
    Slurm's compressed host list to host names, in order, as `scontrol show hostnames` would print them:
    'node[03-05,07],gpu1' -> ['node03', 'node04', 'node05', 'node07', 'gpu1']. Zero padding is kept.
    """
    hosts = []
    # split on commas that are not inside brackets
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        parts = re.split(r"(\[[^\]]*\])", item)
        expanded = [""]
        for part in parts:
            if part.startswith("["):
                choices = []
                for rng in part[1:-1].split(","):
                    lo, _, hi = rng.partition("-")
                    if not hi:
                        choices.append(lo)
                    else:
                        width = len(lo)
                        choices.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
                expanded = [e + c for e in expanded for c in choices]
            elif part:
                expanded = [e + part for e in expanded]
        hosts.extend(expanded)
    return hosts


def detect_launch(env=None):
    """Work out rank, world size and rendezvous address from the environment the launcher left."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun (also `srun torchrun ...`: torchrun sets these)
        return Launch("torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                      env.get("MASTER_ADDR"), int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None)
    # Inside an allocation SLURM_NTASKS is set even in the batch script's own shell; only srun sets SLURM_STEP_ID
    # for the tasks it launches. A one-task step (or salloc shell) is just one process.
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        addr = env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0]
        # a port every task of the job derives alike, spread over 20000-29999 so concurrent jobs rarely collide
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else 20000 + int(env.get("SLURM_JOB_ID", 0)) % 10000
        return Launch("slurm", int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), ntasks, addr, port)
    return Launch("single")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def pick_device(requested):
    """'auto' -> cuda, then mps, then cpu; anything else as given, once it is known to exist here."""
    import torch

    if requested != "auto":
        kind, colon, index = requested.partition(":")
        if kind not in ("cpu", "cuda", "mps") or colon and not (kind == "cuda" and index.isdigit()):
            raise UserError(f"device={requested!r}: expected auto, cpu, cuda, cuda:N or mps")
        mps = getattr(torch.backends, "mps", None)
        if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not (mps and mps.is_available())):
            raise UserError(f"device={requested}: there is no {kind.upper()} device that this torch "
                            f"({torch.__version__}) can use here; use --device=auto or --device=cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UserError(f"device={requested}: this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested, device_type):
    """'auto' -> bfloat16 on GPUs that have it, float16 on older GPUs, float32 on CPU and MPS."""
    import torch

    if requested not in DTYPES:
        raise UserError(f"dtype={requested!r}: expected {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device_type == "cuda":
        # not emulated bf16, which torch reports as supported by default: V100 and T4 would train in it with no
        # loss scaling, and inductor compiles no bf16 graphs for them
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    return "float32"


BACKENDS = ("auto", "nccl", "gloo")


def init_distributed(launch, device, backend="auto"):
    """
    Join the process group when there is more than one process: through `backend`, 'auto' being nccl on CUDA, gloo
    on CPU. Each rank pins its own GPU (cuda:local_rank; a single process keeps an explicit 'cuda:N'). Returns the
    device this process should use.
    """
    import torch
    import torch.distributed as dist

    device_type = device.split(":")[0]
    if device_type == "cuda" and (launch.distributed or device == "cuda"):
        n_gpus = torch.cuda.device_count()
        if launch.local_rank >= n_gpus:
            raise UserError(f"local rank {launch.local_rank} has no GPU: this node has {n_gpus}; launch at most "
                            f"{n_gpus} processes per node (--nproc_per_node / --ntasks-per-node)")
        torch.cuda.set_device(launch.local_rank)
        device = f"cuda:{launch.local_rank}"
    if launch.distributed and backend == "nccl" and device_type != "cuda":  # before anything is set up
        raise UserError(f"backend=nccl runs on CUDA GPUs, and this run's device is {device}: use --backend=gloo or "
                        "auto")
    if launch.distributed:
        # torch.distributed.nn's functions take group.WORLD as a default argument, bound when the module is first
        # imported; DDP and torch.compile import it (through torch._dynamo) after the group exists, and that default
        # then keeps the group alive past destroy_process_group, its gloo threads until interpreter shutdown, where
        # one taking the interpreter lock aborts the process. Imported before there is a group, the default is None.
        # ZeroRedundancyOptimizer's module (shard_optimizer) has such a function too (_broadcast_object).
        import torch.distributed.nn  # noqa: F401
        import torch.distributed.optim.zero_redundancy_optimizer  # noqa: F401
        os.environ.setdefault("MASTER_ADDR", launch.master_addr or "localhost")
        os.environ.setdefault("MASTER_PORT", str(launch.master_port or 29500))
        backend = ("nccl" if device_type == "cuda" else "gloo") if backend == "auto" else backend
        kwargs = {"device_id": torch.device(device)} if device_type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=launch.rank, world_size=launch.world_size, **kwargs)
    return device


def cleanup_distributed():
    """
    Leave the process group, once the DDP model is gone. The DDP reducer holds the group too: left to free it last, it
    destroys the group holding the interpreter lock, and gloo's destructor then waits for a worker thread that waits
    for that lock to free a finished all-reduce's tensors, so the process never exits (seen on rank 1 after a
    preemption stop under srun).
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, launch):
    """`tensor` summed over every rank, in place (unchanged in a single process); returns it."""
    if launch.distributed:
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


ATTENTION_CHOICES = ("auto", "cudnn", "flash", "efficient", "math", "default")


def fast_kernels(device, attention="auto"):
    """
    The fastest CUDA kernels that compute the same function, decided once at start-up: TF32 for the float32 matmuls
    left outside autocast, and a fixed order in which scaled_dot_product_attention tries its backends, rather than
    PyTorch's heuristic, which has changed between releases. 'auto' tries cuDNN's attention first on Hopper and newer
    GPUs (the fastest there, see README) and flash attention first on older ones; 'cudnn', 'flash', 'efficient' or
    'math' put that one first; 'default' keeps PyTorch's order. A backend that cannot take a call (a head size, a
    mask, dropout) passes it to the next: after flash, which takes no mask, the memory-efficient kernel, then cuDNN,
    which takes masks but plans anew for each shape (decoding's change at every step). Returns (a context manager to
    run in, a description); a no-op on CPU/MPS.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not device.startswith("cuda"):
        return contextlib.nullcontext(), "attention: PyTorch's scaled_dot_product_attention for this device"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if attention == "default":
        return contextlib.nullcontext(), "attention: PyTorch's default backend order; TF32 on"
    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}  # the order after the first
    if attention == "auto":
        attention = "cudnn" if torch.cuda.get_device_capability(device)[0] >= 9 else "flash"
    order = [names[attention]] + [b for name, b in names.items() if name != attention]
    return (sdpa_kernel(order, set_priority=True),
            "attention: " + " > ".join(b.name.lower() for b in order) + "; TF32 on")
