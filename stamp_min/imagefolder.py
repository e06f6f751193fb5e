"""An image folder (ImageNet's layout) read without trusting it: data.load_dataset("imagefolder").

    root/train/<class>/**/<image>  and  root/val/<class>/**/<image>  (or root/test/)
    root/<class>/**/<image>        (no train/: a stratified 20 % is held out, as for digits)

Classes are the sorted sub-folder names, images every file under a class folder with an image
extension, in the order torchvision's ImageFolder lists them; each is read with PIL, converted to
RGB and resized to image_size × image_size (torchvision's Resize, then PILToTensor), as ImageFolder
would. What ImageFolder would not refuse, this does, each as one line naming the file or folder
(relative to the data folder, so an error shows no machine's paths):

    a link that leaves the data folder, or a folder or file reached twice (a link loop such as
    a/l -> .., which would make os.walk run forever; a link to another class's images, which
    would label them twice); a class folder without images; a file that is no readable image;
    an image whose header claims more than MAX_PIXELS pixels (a decompression bomb: a 50 kB PNG
    can claim 20000 × 20000). FIFOs, devices and sockets are never opened.
"""

import os
import warnings
from pathlib import Path

import torch

from . import UserError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # torchvision's
MAX_PIXELS = 40_000_000         # width x height; a photo of 6000 x 6000 is 36 M; above: refused before decoding
WHO = "dataset='imagefolder'"


def inside(path, root):
    return path == root or root in path.parents


def real(path, root, seen):
    """The real path of `path` (under root), checked: no broken link or loop of links, not leaving
    root, not reached before (`seen`: the real paths met so far, updated)."""
    rel = str(path.relative_to(root))
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):               # a dangling link, or a loop of links
        raise UserError(f"{WHO}: {rel!r} is a broken link or a loop of links; allowed: real files and folders, or "
                        f"links to them inside the data folder") from None
    if not inside(target, root):
        raise UserError(f"{WHO}: {rel!r} is a link that leaves the data folder; allowed: links that stay inside it "
                        f"(copy the files in, or point data_root at their folder)")
    if target in seen:
        raise UserError(f"{WHO}: {rel!r} reaches {str(target.relative_to(root)) or '.'!r} a second time (a link loop, "
                        f"or a link to images already counted); allowed: every folder and image reached once")
    seen.add(target)
    return target


def files(class_dir, root, seen):
    """Every image file under class_dir, sorted as ImageFolder sorts them ((folder, name) order),
    following links that stay inside root."""
    found, stack = [], [class_dir]
    while stack:
        folder = stack.pop()
        names = []
        for entry in os.scandir(folder):
            path = Path(entry.path)
            if entry.is_symlink() or entry.is_dir() or entry.is_file():    # never a FIFO, a device or a socket
                real(path, root, seen)
            if entry.is_dir():
                stack.append(path)
            elif entry.is_file() and entry.name.lower().endswith(EXTENSIONS):
                names.append(entry.name)
        found.append((str(folder), sorted(names)))
    return [os.path.join(folder, n) for folder, names in sorted(found) for n in names]


def listing(folder, root, seen):
    """([(path, class index)], class names) of one split folder."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        where = str(folder.relative_to(root)) if folder != root else "data_root"
        raise UserError(f"{WHO}: {where!r} has no class folder; allowed: a folder with one sub-folder of images per "
                        f"class (optionally under train/ and val/)")
    for c in classes:                              # every class folder first: a link to one is caught as such
        real(folder / c, root, seen)
    samples = []
    for i, c in enumerate(classes):
        paths = files(folder / c, root, seen)
        if not paths:
            raise UserError(f"{WHO}: class folder {str((folder / c).relative_to(root))!r} holds no image; allowed: at "
                            f"least one {'/'.join(EXTENSIONS)} file in every class folder (or remove the folder)")
        samples += [(p, i) for p in paths]
    return samples, classes


def read(path, root, image_size):
    """(3, image_size, image_size) uint8, as ImageFolder's loader and Resize + PILToTensor give it."""
    from PIL import Image
    from torchvision import transforms
    rel = str(Path(path).relative_to(root))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise Image.DecompressionBombError(f"{im.width} x {im.height}")
                rgb = im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:   # its header claims too much
        size = str(e) if " x " in str(e) else f"over {Image.MAX_IMAGE_PIXELS:,}"
        raise UserError(f"{WHO}: {rel!r} is too large ({size} pixels, a decompression bomb?); allowed: images of at "
                        f"most {MAX_PIXELS:,} pixels") from None
    except (OSError, ValueError, SyntaxError) as e:          # PIL: truncated, not an image, bad header
        raise UserError(f"{WHO}: {rel!r} is not a readable image ({type(e).__name__}); allowed: delete or replace "
                        f"that file") from None
    return transforms.PILToTensor()(transforms.Resize((image_size, image_size))(rgb))


def split(folder, root, image_size, seen):
    samples, classes = listing(folder, root, seen)
    return torch.stack([read(p, root, image_size) for p, _ in samples]), torch.tensor([c for _, c in samples]).long(), classes


def load(root, image_size):
    """((x_train, y_train), (x_test, y_test) or None when there is no train/ and val/, number of
    classes) of the image folder at `root`; x: (N, 3, image_size, image_size) uint8."""
    if not Path(root).is_dir():
        raise UserError(f"{WHO}: data_root is not a folder; allowed: a folder with one sub-folder of images per class "
                        f"(optionally under train/ and val/)")
    root = Path(root).resolve()
    seen = {root}
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        real(root / "train", root, seen), real(test_dir, root, seen)
        x, y, classes = split(root / "train", root, image_size, seen)
        x_te, y_te, classes_te = split(test_dir, root, image_size, seen)
        if classes_te != classes:
            raise UserError(f"{WHO}: train/ and {test_dir.name}/ have different class folders; allowed: the same class "
                            f"sub-folders in both")
        return (x, y), (x_te, y_te), len(classes)
    x, y, classes = split(root, root, image_size, seen)
    return (x, y), None, len(classes)
