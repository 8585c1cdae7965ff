"""Build the small ImageFolder of real photos used for the README's `afconvert eval` run.

    python examples/eval_photos.py photos/      # then: afconvert eval efficientnet_lite0 m.pt --data photos/

Three skimage photos with an unambiguous ImageNet-1k class, four views each (full, mirrored, central
80 % crop, mirrored crop), in folders named by class index: 282 tiger cat (chelsea; the class the
original EfficientNet-Lite0 predicts among the cat classes), 967 espresso (coffee), 892 wall clock
(clock, a grayscale photo that the original model gets wrong).
"""
import sys
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image, ImageOps

PHOTOS = {"chelsea": 282, "coffee": 967, "clock": 892}


def main(root: str) -> None:
    for name, cls in PHOTOS.items():
        a = getattr(skimage.data, name)()
        im = Image.fromarray(np.stack([a] * 3, -1) if a.ndim == 2 else a)
        w, h = im.size
        crop = im.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9), int(h * 0.9)))
        out = Path(root) / str(cls)
        out.mkdir(parents=True, exist_ok=True)
        views = {"full": im, "mirror": ImageOps.mirror(im), "crop80": crop, "crop80_mirror": ImageOps.mirror(crop)}
        for view, img in views.items():
            img.save(out / f"{name}_{view}.png")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "photos")
