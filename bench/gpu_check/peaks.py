"""Peak dense tensor-core throughput by card, for the MFU column (`--peak-tflops` overrides it).

Figures are the vendors' datasheet numbers without structured sparsity (the datasheets headline twice these),
with fp32 accumulation where the card has two rates (RTX 4090). A card not listed gets no MFU rather than a
guess.
"""

# (a substring of torch.cuda.get_device_name, bf16 TFLOP/s, fp8 TFLOP/s or None). The first match wins, so the
# variants that share a family name come before the family.
DEVICE_PEAKS = (
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.5, 1670.5),
    ("H100", 989.4, 1978.9),  # SXM5 (HBM3): torch names it "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.5, 1670.5),
    ("H200", 989.4, 1978.9),  # SXM: the H100's compute with more and faster memory
    ("A100", 312.0, None),  # no fp8 tensor cores
    ("L40S", 362.05, 733.0),
    ("RTX 4090", 165.2, 330.3),
)


def peak_tflops(card: str, override: float = None) -> dict:
    """{"bf16": TFLOP/s or None, "fp8": TFLOP/s or None, "source": where they come from} for a device name."""
    if override:
        return dict(bf16=float(override), fp8=None, source="--peak-tflops")
    for name, bf16, fp8 in DEVICE_PEAKS:
        if name.lower() in card.lower():
            return dict(bf16=bf16, fp8=fp8, source=f"datasheet ({name}, dense)")
    return dict(bf16=None, fp8=None, source="unknown card: pass --peak-tflops for an MFU")
