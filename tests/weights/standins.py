"""Stand-in checkpoint files, built from real super-gradients models (SG's download URLs are dead).

`python -m tests.weights.standins OUT_DIR` writes, in a process of its own (importing super-gradients
rewires stdout and logging):

- `yolo_nas_s_coco.pth`: `{"net": state_dict}` of a YOLO-NAS-S with 80 classes and no names, the
  layout of SG's published COCO files and of the seed's PRETRAINED_MODEL_PATH recipe;
- `s80_ema.pth` (`{"ema_net": ...}`) and `s80_bare.pth` (a bare state dict): the same weights in the
  two other layouts SG reads;
- `s5_named.pth`: a 5-class YOLO-NAS-S with `module.`-prefixed keys and class names in
  `processing_params`, as a DDP-trained SG checkpoint carries them;
- `yolox_n.pth`: a checkpoint of another architecture (SG's YOLOX-N);
- `truncated.pth`: the first half of `s5_named.pth`; `text.pth`: not a checkpoint at all;
- `evil.pth` (a torch checkpoint) and `evil.pkl` (a plain pickle) whose `__reduce__` would create
  the file `canary` next to them when unpickled.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

FIVE_CLASSES = ["ant", "bee", "cat", "dog", "eel"]
CANARY = "canary"
STANDINS = (
    "yolo_nas_s_coco.pth",
    "s80_ema.pth",
    "s80_bare.pth",
    "s5_named.pth",
    "yolox_n.pth",
    "truncated.pth",
    "text.pth",
    "evil.pth",
    "evil.pkl",
)


class Payload:
    """Unpickling this runs `touch <canary>`: what a malicious checkpoint does."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.canary}",))


def write_standins(out: Path) -> None:
    """Write every stand-in into `out` (see the module docstring)."""
    import torch
    from super_gradients.training import models

    out.mkdir(parents=True, exist_ok=True)
    s80 = models.get("yolo_nas_s", num_classes=80, pretrained_weights=None).state_dict()
    torch.save({"net": s80}, out / "yolo_nas_s_coco.pth")
    torch.save({"ema_net": s80}, out / "s80_ema.pth")
    torch.save(s80, out / "s80_bare.pth")
    s5 = models.get("yolo_nas_s", num_classes=5, pretrained_weights=None).state_dict()
    torch.save(
        {
            "net": {f"module.{k}": v for k, v in s5.items()},
            "processing_params": {"class_names": FIVE_CLASSES},
        },
        out / "s5_named.pth",
    )
    yolox = models.get("yolox_n", num_classes=3, pretrained_weights=None).state_dict()
    torch.save({"net": yolox}, out / "yolox_n.pth")
    data = (out / "s5_named.pth").read_bytes()
    (out / "truncated.pth").write_bytes(data[: len(data) // 2])
    (out / "text.pth").write_text("this is a text file, not a checkpoint\n" * 100)
    payload = Payload(out / CANARY)
    torch.save({"net": payload}, out / "evil.pth")
    (out / "evil.pkl").write_bytes(pickle.dumps({"net": payload}, protocol=2))


def build_standins(out: Path) -> Path:
    """Write the stand-ins into `out` in a child process (SG stays out of the test process)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.weights.standins", str(out)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the stand-ins failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return out


if __name__ == "__main__":
    write_standins(Path(sys.argv[1]))
