"""Using trained spheregen methods from Python (run as a script or paste into a notebook).

Train first, e.g. ``spheregen run experiments/quickstart.toml``; then::

    python examples/notebook.py runs/quickstart sphere-latent

Nothing here opens the dataset: ``spheregen.load`` needs only the run's final folder.
"""

import sys

import torch
from PIL import Image

import spheregen


def grid(images: torch.Tensor, rows: int) -> Image.Image:
    """uint8 N×C×H×W -> one PIL image, ``rows`` rows."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        canvas[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    arr = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if c == 1 else arr)


def main(run: str = "runs/quickstart", method: str = "sphere-latent") -> None:
    g = spheregen.load(run, method=method)
    print(f"{method}: step {g.config['step']}, {g.spec.image_size}px, {g.spec.num_classes} classes, "
          f"guidance {g.entry.guidance}")
    labels = [c for c in range(g.spec.num_classes) for _ in range(4)]
    for steps in (1, 2, 4):
        images = g.sample(labels, steps=steps, seed=0)  # uint8 N×C×H×W
        grid(images, rows=g.spec.num_classes).save(f"{method}_steps{steps}.png")
        print(f"  {steps} step(s): {tuple(images.shape)} -> {method}_steps{steps}.png")
    if hasattr(g.method, "reconstruct"):
        recon = g.reconstruct(images[:8])
        print(f"  reconstruction of 8 samples: mean |diff| {(recon.float() - images[:8].float()).abs().mean():.1f} / 255")


if __name__ == "__main__":
    main(*sys.argv[1:])
