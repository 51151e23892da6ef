"""``--compile auto``: compile the training model only where the planned run pays the compile back.

Measured on one NVIDIA H200 (torch 2.11, ResNet50 at 224 px, bf16, batch 256; docs/measurements.md): the model alone
trains at 11,424 img/s eager and 18,962 compiled at depth 1, 4,699 and 6,821 at depth 4, after 19 to 52 s of
compiling. So compiling saves about 35 us per image at depth 1 and 66 us at depth 4, and pays after
0.8 to 1.5 million images on that card. A slower GPU saves more per image and pays sooner, so these
figures make the rule cautious there. On CPUs it is off: on the 2-core dev CPU it took 28 s to compile and
trained no faster (23.5 vs 24.2 img/s, depth 1).
"""

from __future__ import annotations

# Model-alone training img/s (eager, compiled) on an H200, by unfrozen depth; depths 2 and 3 use depth 1's
# figures, whose smaller saving per image makes the rule compile less often.
H200_IMG_S = {1: (11_424, 18_962), 4: (4_699, 6_821)}
# The longest compile measured; twice it must be saved (validation's shapes and a resize recompile too).
COMPILE_S = 52.0
PAYBACK = 2.0


def decide(setting: str, device_type: str, planned_images: int, unfrozen_depth: int) -> tuple[bool, str]:
    """``(compile, why)`` for ``--compile setting`` on a process that still trains ``planned_images`` images (its
    share of the run: every DDP rank compiles its own copy)."""
    if setting in ("on", "off"):
        return setting == "on", f"--compile {setting}"
    if device_type != "cuda":
        return False, "--compile auto: off on a CPU (measured not to pay there)"
    eager, compiled = H200_IMG_S[4 if unfrozen_depth >= 4 else 1]
    saved = planned_images * (1 / eager - 1 / compiled)
    pays = saved >= PAYBACK * COMPILE_S
    return pays, (f"--compile auto: {planned_images:,} planned images would save about {saved:.0f} s on an H200 "
                  f"against up to {COMPILE_S:.0f} s of compiling: {'on' if pays else 'off'}")
