"""machine(): the device a figure was measured on, named as a reader can look it up (bench.py's tables and the
studies of experiments/ print it beside their times)."""
import os
import platform
import re
from pathlib import Path

import torch


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
