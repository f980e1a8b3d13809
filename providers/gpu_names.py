"""One name per GPU model across providers: Vast says "A10g" and "RTX 4500Ada", RunPod says
"NVIDIA GeForce RTX 4090"; rentrain says "A10G", "RTX 4500 Ada", "RTX 4090".

Sources: PROVIDERS.md §4 (Vast `vastai/data/query.py` GPU list; RunPod `references/gpu-types.mdx`).
"""

from __future__ import annotations

import re

# canonical name -> spellings seen on the providers' wires (and common user spellings)
_SPELLINGS: dict[str, tuple[str, ...]] = {
    "RTX 3090": ("RTX 3090", "NVIDIA GeForce RTX 3090"),
    "RTX 3090 Ti": ("RTX 3090 Ti", "NVIDIA GeForce RTX 3090 Ti"),
    "RTX 4090": ("RTX 4090", "NVIDIA GeForce RTX 4090"),
    "RTX 4090D": ("RTX 4090D", "RTX 4090 D"),
    "RTX 5090": ("RTX 5090", "NVIDIA GeForce RTX 5090"),
    "RTX 4080": ("RTX 4080", "NVIDIA GeForce RTX 4080"),
    "RTX 3080": ("RTX 3080", "NVIDIA GeForce RTX 3080"),
    "RTX A4000": ("RTX A4000", "NVIDIA RTX A4000"),
    "RTX A4500": ("RTX A4500", "NVIDIA RTX A4500"),
    "RTX A5000": ("RTX A5000", "NVIDIA RTX A5000"),
    "RTX A6000": ("RTX A6000", "NVIDIA RTX A6000"),
    "RTX 4000 Ada": ("RTX 4000Ada", "NVIDIA RTX 4000 Ada Generation"),
    "RTX 4500 Ada": ("RTX 4500Ada", "NVIDIA RTX 4500 Ada Generation"),
    "RTX 5000 Ada": ("RTX 5000Ada", "NVIDIA RTX 5000 Ada Generation"),
    "RTX 6000 Ada": ("RTX 6000Ada", "NVIDIA RTX 6000 Ada Generation"),
    "RTX PRO 6000": ("RTX PRO 6000", "RTX PRO 6000 WS", "NVIDIA RTX PRO 6000 Blackwell Workstation Edition"),
    "Quadro RTX 6000": ("Q RTX 6000", "Quadro RTX 6000"),
    "Titan RTX": ("Titan RTX",),
    "Tesla P40": ("Tesla P40",),
    "A10": ("A10", "NVIDIA A10"),
    "A10G": ("A10g", "A10G"),
    "A30": ("A30", "NVIDIA A30"),
    "A40": ("A40", "NVIDIA A40"),
    "L4": ("L4", "NVIDIA L4"),
    "L40": ("L40", "NVIDIA L40"),
    "L40S": ("L40S", "NVIDIA L40S"),
    "A100 PCIe": ("A100 PCIE", "NVIDIA A100 80GB PCIe", "NVIDIA A100 PCIe"),
    "A100 SXM": ("A100 SXM4", "A100 SXM", "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB"),
    "H100 PCIe": ("H100 PCIE", "NVIDIA H100 PCIe"),
    "H100 SXM": ("H100 SXM", "NVIDIA H100 80GB HBM3"),
    "H100 NVL": ("H100 NVL", "NVIDIA H100 NVL"),
    "H200": ("H200", "NVIDIA H200"),
}


def _key(name: str) -> str:
    text = name.lower()
    text = re.sub(r"\b(nvidia|geforce)\b", "", text)
    text = re.sub(r"\b(generation|gen)\b", "", text)
    return re.sub(r"[\s_\-]+", "", text)


_BY_KEY: dict[str, str] = {}
for _canonical, _names in _SPELLINGS.items():
    for _name in (_canonical, *_names):
        _BY_KEY.setdefault(_key(_name), _canonical)


def normalise_gpu_name(raw: str) -> str:
    """The canonical model name; an unknown name comes back tidied (vendor words and underscores removed)."""
    key = _key(raw)
    if key in _BY_KEY:
        return _BY_KEY[key]
    if "rtx" + key in _BY_KEY:  # "4090" -> "RTX 4090"
        return _BY_KEY["rtx" + key]
    tidy = re.sub(r"\b(NVIDIA|GeForce)\b", "", raw.replace("_", " "), flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", tidy).strip() or raw


def is_known(name: str) -> bool:
    return normalise_gpu_name(name) in _SPELLINGS


def vast_wire_names(canonical: str) -> list[str]:
    """What to put in Vast's `gpu_name` filter: the spellings Vast uses, with spaces (PROVIDERS.md §1.3)."""
    spellings = _SPELLINGS.get(normalise_gpu_name(canonical))
    if not spellings:
        return [canonical]
    return [s for s in spellings if not s.startswith("NVIDIA ")]
