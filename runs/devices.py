"""
Devices, processes and precision: which device a run may use, the DDP wait that cannot time
out, autocast and loss scaling, peak FLOP/s (MFU's denominator) and peak memory.
"""

import contextlib
import datetime
import os
import resource
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from runs.errors import ConfigError

# Dense bf16 peak FLOP/s by CUDA device name (MFU's denominator). On CPU we measure instead.
GPU_PEAK_FLOPS = {'H200': 989e12, 'H100 NVL': 835e12, 'H100 PCIe': 756e12, 'H100': 989e12, 'A100': 312e12,
                  'L40S': 362e12, 'L40': 181e12, 'L4': 121e12, 'A10G': 70e12, 'A10': 125e12, 'RTX 4090': 165e12,
                  'RTX 3090': 71e12, 'V100': 125e12, 'T4': 65e12}
PRECISIONS = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}
_cpu_peak = {}                                   # measured once per process, raised by what we observe
_wait_group = None                               # DDP: the group that barrier() waits in


def resolve_device(name):
    """'auto' -> cuda if there is one, else cpu. A device that is not there is a settings mistake,
    caught here before any data is read or any reference is trained."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cpu':
        return name
    if not name.startswith('cuda'):
        raise ConfigError(f"device {name!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU here "
                          f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device=cpu")
    index = name.partition(':')[2]
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def to_device(tensor, device):
    """Copy a host tensor to `device` without making the host wait: on CUDA from pinned memory,
    non-blocking (a pageable copy waits for the GPU to finish its queue first); on CPU a no-op."""
    if str(device).startswith('cuda'):
        return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)
    return tensor.to(device)


def init_distributed(backend):
    """torchrun's process group, plus a gloo group for barrier(): rank 0 alone trains the reference
    or the encoder and runs the final eval while the others wait, which at LLaVA scale outlasts
    NCCL's 10-minute timeout. Only those waits get the long timeout; training collectives keep theirs."""
    global _wait_group
    dist.init_process_group(backend=backend)
    _wait_group = dist.new_group(backend='gloo', timeout=datetime.timedelta(days=7))


def barrier():
    """Every process meets here (no-op without DDP)."""
    if dist.is_initialized():
        dist.barrier(group=_wait_group)


def any_process(flag):
    """Whether `flag` is true on any process (itself without DDP). On the CPU wait group: no GPU sync."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_wait_group)
    return bool(t.item())


def precision_context(device, precision='auto'):
    """Autocast for `precision` ('auto': bf16 on CUDA, fp32 elsewhere, since bf16 is far slower on CPU)."""
    dtype = PRECISIONS[resolve_precision(device, precision)]
    if str(device).startswith('cuda'):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def resolve_precision(device, precision):
    if precision == 'auto':
        return 'bf16' if str(device).startswith('cuda') else 'fp32'
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of 'auto', {', '.join(map(repr, PRECISIONS))}")
    return precision


def grad_scaler(device, precision):
    """fp16 gradients underflow without loss scaling: a GradScaler for fp16, else None."""
    if resolve_precision(device, precision) != 'fp16':
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def device_peak_flops(device, observed=0.0):
    """Peak FLOP/s of `device`: the table above on CUDA (None if unknown); on CPU the best fp32 matmul
    rate measured here, raised to `observed` (FLOP/s the caller just achieved) when that is higher: a
    peak measured while the machine was busy is too low, and MFU must never read above 100%."""
    if str(device).startswith('cuda'):
        name = torch.cuda.get_device_name(device)
        known = [k for k in GPU_PEAK_FLOPS if k in name]
        return GPU_PEAK_FLOPS[max(known, key=len)] if known else None      # 'L40S' over 'L4'
    if 'cpu' not in _cpu_peak:
        g = torch.Generator().manual_seed(0)     # not the global RNG: every run in a process draws the same
        a, b = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
        a @ b                                    # warm up the BLAS threads first
        best = float('inf')
        for _ in range(10):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        _cpu_peak['cpu'] = 2 * 1024 ** 3 / best
    _cpu_peak['cpu'] = max(_cpu_peak['cpu'], observed)
    return _cpu_peak['cpu']


def reset_peak_memory(cuda):
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    elif os.access('/proc/self/clear_refs', os.W_OK):      # Linux: restarts ru_maxrss
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')


def peak_memory(cuda):
    """Bytes: allocated tensors on CUDA; the process's peak resident set on CPU (Linux KiB)."""
    return torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def wrap(model, compile, ddp, device):
    """What trains: the model, compiled if asked, in DistributedDataParallel under torchrun."""
    wrapped = torch.compile(model) if compile else model
    if ddp:
        wrapped = DDP(wrapped, device_ids=[torch.cuda.current_device()] if str(device).startswith('cuda') else None)
    return wrapped


def setup_processes(cfg):
    """(ddp, device, rank, world): torchrun's environment means DDP, one process per device.
    A device that is not there stops the run here, before any data or reference work."""
    device = resolve_device(cfg.device)
    resolve_precision(device, cfg.precision)
    if int(os.environ.get('RANK', -1)) == -1:
        return False, device, 0, 1
    device = f"cuda:{int(os.environ['LOCAL_RANK'])}" if device.startswith('cuda') else 'cpu'
    if device != 'cpu':
        torch.cuda.set_device(device)
    init_distributed('nccl' if device != 'cpu' else 'gloo')
    return True, device, dist.get_rank(), dist.get_world_size()
