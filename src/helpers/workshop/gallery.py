"""Pictures for the notebooks: grids of generated images with their prompts."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def image_grid(
    images: Sequence[Image.Image | None],
    titles: Sequence[str] | None = None,
    columns: int = 4,
    cell_inches: float = 1.8,
    suptitle: str | None = None,
):
    """A matplotlib figure showing `images` in rows of `columns`, each with its title.

    Small pictures are shown with nearest-neighbour scaling, so 64x64 pixels stay crisp. A
    `None` in `images` leaves its cell blank (to start the next row on a new kind of picture).
    """
    import matplotlib.pyplot as plt

    if not images:
        raise ValueError("images must not be empty")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles has {len(titles)} entries for {len(images)} images")
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(columns * cell_inches, rows * (cell_inches + 0.3)), squeeze=False
    )
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < len(images) and images[index] is not None:
            axis.imshow(images[index], interpolation="nearest")
            if titles is not None:
                axis.set_title(titles[index], fontsize=8)
    if suptitle:
        figure.suptitle(suptitle)
    figure.tight_layout()
    return figure


def generate(
    pipe,
    prompt: str,
    seeds: Sequence[int],
    steps: int = 20,
    guidance: float = 5.0,
    size: int = 64,
) -> list[Image.Image]:
    """One picture of `prompt` per seed (a CPU generator each, so results repeat anywhere)."""
    import torch

    images = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        result = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=generator,
        )
        images.append(result.images[0])
    return images


def prompt_grid(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 20,
    guidance: float = 5.0,
    size: int = 64,
):
    """Generate one picture per (prompt, seed) with `pipe` and lay them out prompt by row.

    Returns:
        `(figure, images)`: the matplotlib figure and the pictures, prompt-major.
    """
    images, titles = [], []
    for prompt in prompts:
        images += generate(pipe, prompt, seeds, steps=steps, guidance=guidance, size=size)
        for seed in seeds:
            titles.append(f"{prompt.removeprefix('a photo of ')}\nseed {seed}")
    figure = image_grid(images, titles, columns=len(seeds) * 2 if len(prompts) > 1 else len(seeds))
    return figure, images


def accuracy_heatmap(report):
    """A colour x shape heatmap of a `PromptFollowingReport`'s per-prompt hit rates."""
    import matplotlib.pyplot as plt
    import numpy as np

    from helpers.workshop.basemodel.drawing import COLORS, SHAPES, prompt_for

    grid = np.array(
        [
            [report.per_prompt.get(prompt_for(color, shape), np.nan) for shape in SHAPES]
            for color in COLORS
        ]
    )
    figure, axis = plt.subplots(figsize=(4.6, 3.6))
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axis.set_xticks(range(len(SHAPES)), SHAPES, rotation=30)
    axis.set_yticks(range(len(COLORS)), list(COLORS))
    for row, col in np.ndindex(grid.shape):
        axis.text(
            col,
            row,
            f"{grid[row, col]:.0%}",
            ha="center",
            va="center",
            color="white" if grid[row, col] < 0.6 else "black",
            fontsize=8,
        )
    axis.set_title(f"right colour and shape: {report.accuracy:.0%}")
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    return figure
