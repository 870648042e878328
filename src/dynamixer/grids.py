"""Token grids of the stages: which input sizes an architecture takes, and the grid of every stage.

Its own module because both the model (`model.py`) and the resampling of weights for another size
(`resample.py`) need it, and neither imports the other.
"""
import operator
from typing import List, Sequence, Tuple

__all__ = ['token_grids']


def token_grids(
        img_size: Tuple[int, int],
        patch_size: int,
        downsamples: Sequence[bool],
) -> List[Tuple[int, int]]:
    """Token grid (H, W) of every stage for an input of `img_size`.

    Raises ValueError, naming the nearest sizes that work, when the size is not divisible by the
    patch size and by 2 for every 2x2 stride-2 transition.
    """
    num_down = sum(bool(d) for d in downsamples)
    step = patch_size * 2 ** num_down
    try:
        if len(img_size) != 2 or any(isinstance(s, bool) for s in img_size):
            raise TypeError
        img_size = (operator.index(img_size[0]), operator.index(img_size[1]))  # ints only: 48.0, '48' refused
    except TypeError:
        raise ValueError(
            f'img_size must be an int or a pair of ints (height, width); got {img_size!r}.') from None
    if any(s % step != 0 or s < step for s in img_size):
        near, fits = [], []
        for axis, s in zip(('height', 'width'), img_size):
            lower = (s // step) * step
            options = sorted({v for v in (lower, lower + step) if v >= step} or {step})
            near.append(f'{axis} {s}: ' + (str(s) if s % step == 0 and s >= step else ' or '.join(map(str, options))))
            fits.append(s if s % step == 0 and s >= step else min(options, key=lambda v: (abs(v - s), v)))
        raise ValueError(
            f'img_size {tuple(img_size)} does not fit this architecture: height and width must be '
            f'positive multiples of {step} (patch size {patch_size} x 2^{num_down} transitions). '
            f'Nearest sizes that work: {"; ".join(near)} (e.g. img_size={tuple(fits)}).')
    grids = []
    h, w = img_size[0] // patch_size, img_size[1] // patch_size
    for down in downsamples:
        if down:
            h, w = h // 2, w // 2
        grids.append((h, w))
    return grids
