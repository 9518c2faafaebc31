"""The machine a process runs on: machine(), the device a figure was measured on, named as a reader can look it up
(bench.py's tables and the studies of experiments/ print it beside their times); peak_mem_mb(), the memory a run
has taken (train.py logs it); join_processes(), the process group and device of a torchrun process."""
import os
import platform
import re
from pathlib import Path

import torch
import torch.distributed as dist


def machine(device="cpu"):
    """GPU name, or CPU model and its vector units, with torch's thread count."""
    if str(device).startswith("cuda"):
        cc = torch.cuda.get_device_capability()
        return f"{torch.cuda.get_device_name()} (sm_{cc[0]}{cc[1]}), CUDA {torch.version.cuda}"
    model, flags = platform.processor() or platform.machine(), ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1).strip()
        have = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split())
        flags = "/".join(f for f in ("avx2", "fma", "avx512f") if f in have)
    except (OSError, AttributeError):
        pass
    return f"{model}, {os.cpu_count()} cores, {flags or 'no AVX2'}, {torch.get_num_threads()} threads"


def peak_mem_mb(dev):
    """Peak memory so far: on CUDA what tensors took on this GPU, on the CPU the process's resident set."""
    if dev.startswith("cuda"):
        return round(torch.cuda.max_memory_allocated(dev) / 2 ** 20)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)   # Linux reports KiB


def join_processes(device, world):
    """Under torchrun (world > 1 processes) join the process group: NCCL with this process's GPU, cuda:LOCAL_RANK
    (given from the start, so NCCL knows it), or gloo on the CPU. Returns the device this process trains on."""
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=torch.device(device))
        else:
            dist.init_process_group("gloo")
    return device
