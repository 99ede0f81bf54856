"""Data with richer conditions than one class: a set of labels per image (multi-hot) and a layout (a label per
pixel). The built-in `objects` scenes, and the same read from files in the formats of the iCLEVR task
(`train.json`: file -> list of label names; `objects.json`: label name -> index; `test.json`/`new_test.json`:
lists of label lists) with layouts as PNG maps (pixel value 1 + the label's index, 0 background) or boxes
(`{"file": [[x0, y0, x1, y1, "label"], ...]}`, pixel coordinates of the image file, later boxes on top).

`objects`: 1-3 non-overlapping objects out of 8 colours x 3 shapes (24 labels) on a plain background, varied in
size, position and rotation, antialiased, deterministic from the seed. Some pairs of labels never appear
together in it (HELD_OUT_PAIRS): new_test.json asks for them, so it measures generalisation to new combinations.

    python scenes.py export data/objects --image-size 32      # images/, train.json, objects.json, test.json,
                                                              # new_test.json, layouts/, boxes.json
    python train_script.py --model diffusion --data objects --image-size 32                 # multi-label
    python train_script.py --model diffusion --data objects --image-size 32 --condition layout
    python train_script.py --model diffusion --data data/objects/images --labels data/objects/train.json \\
        --label-names data/objects/objects.json                                             # the same, from files
    python random_generation.py --model diffusion --labels data/objects/test.json --fid
"""
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import common
import image_data
from common import UserError
from image_data import ImageData

COLOURS = {"gray": (87, 87, 87), "red": (173, 35, 35), "blue": (42, 75, 215), "green": (29, 105, 20),
           "brown": (129, 74, 25), "purple": (129, 38, 192), "cyan": (41, 208, 208), "yellow": (255, 238, 51)}
SHAPES = ("square", "circle", "triangle")
LABEL_NAMES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]   # objects.json's order
# Pairs of label indices that no training scene holds together; new_test.json asks for them.
HELD_OUT_PAIRS = [(0, 9), (1, 18), (2, 11), (3, 20), (4, 13), (5, 22), (6, 15), (7, 16),
                  (8, 17), (10, 19), (12, 21), (14, 23), (0, 5), (9, 14), (18, 23), (2, 7)]
TEST_SIZE = 32


def scene_labels(rng, held_out=False):
    """1-3 distinct label indices; with held_out, a set holding one of HELD_OUT_PAIRS, else one holding none."""
    if held_out:
        pair = list(HELD_OUT_PAIRS[rng.integers(len(HELD_OUT_PAIRS))])
        others = [i for i in range(len(LABEL_NAMES)) if i not in pair]
        return pair + ([int(rng.choice(others))] if rng.random() < 0.5 else [])
    while True:
        labels = [int(i) for i in rng.choice(len(LABEL_NAMES), rng.integers(1, 4), replace=False)]
        if not any(a in labels and b in labels for a, b in HELD_OUT_PAIRS):
            return labels


def draw_scene(rng, labels, image_size, supersample=4):
    """One scene: (image (S, S, 3) uint8, layout (S, S) uint8, boxes [[x0, y0, x1, y1, name], ...] in pixels).

    The objects' sizes and places are drawn together, and again until no two of them overlap (their bounding
    circles, with a margin); for three objects about one draw in 12 fits, so a hundred draws all overlap in about
    one scene in 6,000. Drawn at `supersample` times the size and shrunk, which antialiases the image; the layout
    is shrunk with nearest, so each pixel keeps one label."""
    big = image_size * supersample
    while True:
        radii = rng.uniform(0.11, 0.19, size=len(labels)) * big
        centres = [rng.uniform(r * 1.15, big - r * 1.15, size=2) for r in radii]
        if all(np.hypot(*(centres[i] - centres[j])) > 1.15 * (radii[i] + radii[j]) + 0.02 * big
               for i in range(len(labels)) for j in range(i)):
            break
    grey = int(rng.integers(200, 232))
    image = Image.new("RGB", (big, big), tuple(int(v) for v in grey + rng.integers(-6, 7, size=3)))
    layout = Image.new("L", (big, big), 0)
    boxes = []
    for label, r, (cx, cy) in zip(labels, radii, centres):
        colour, shape = LABEL_NAMES[label].split()
        fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3), 0, 255))
        if shape == "circle":
            outline = None
        else:
            corners, reach, angle = (4, r, rng.uniform(0, math.pi / 2)) if shape == "square" else \
                (3, 1.15 * r, rng.uniform(0, 2 * math.pi / 3))
            outline = [(cx + reach * math.cos(angle + 2 * math.pi * k / corners),
                        cy + reach * math.sin(angle + 2 * math.pi * k / corners)) for k in range(corners)]
        for canvas, value in ((ImageDraw.Draw(image), fill), (ImageDraw.Draw(layout), label + 1)):
            if outline is None:
                canvas.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value)
            else:
                canvas.polygon(outline, fill=value)
        xs, ys = ([p[0] for p in outline], [p[1] for p in outline]) if outline else ([cx - r, cx + r], [cy - r, cy + r])
        boxes.append([round(min(xs) / supersample, 2), round(min(ys) / supersample, 2),
                      round(max(xs) / supersample, 2), round(max(ys) / supersample, 2), LABEL_NAMES[label]])
    image = np.asarray(image.resize((image_size, image_size), Image.LANCZOS), dtype=np.uint8)
    layout = np.asarray(layout.resize((image_size, image_size), Image.NEAREST), dtype=np.uint8)
    return image, layout, boxes


def multi_hot(label_lists, num_labels):
    """Lists of label indices -> (N, K) uint8 multi-hot."""
    hot = torch.zeros(len(label_lists), num_labels, dtype=torch.uint8)
    for i, labels in enumerate(label_lists):
        hot[i, labels] = 1
    return hot


def make_objects(n=3000, image_size=32, channels=3, seed=0, with_boxes=False):
    """The built-in `objects` data: ImageData with multi-hot labels and layouts (and the boxes, if asked)."""
    rng = np.random.default_rng(seed)
    images, layouts, label_lists, boxes = [], [], [], []
    for _ in range(n):
        labels = scene_labels(rng)
        image, layout, scene_boxes = draw_scene(rng, labels, image_size)
        images.append(image.mean(axis=2, keepdims=True).round().astype(np.uint8) if channels == 1 else image)
        layouts.append(layout)
        label_lists.append(labels)
        boxes.append(scene_boxes)
    data = ImageData(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                     torch.zeros(n, dtype=torch.int64), ["objects"], "objects", list(LABEL_NAMES),
                     multi_hot(label_lists, len(LABEL_NAMES)), torch.from_numpy(np.stack(layouts)))
    return (data, boxes) if with_boxes else data


def test_label_sets(held_out, seed=0):
    """TEST_SIZE label-name lists: test.json (held_out False: combinations as in training) or new_test.json."""
    rng = np.random.default_rng([seed, 1 + held_out])
    return [[LABEL_NAMES[i] for i in scene_labels(rng, held_out)] for _ in range(TEST_SIZE)]


def export(out, n=3000, image_size=32, seed=0):
    """Write the built-in data in the file formats: exactly what `make_objects` gives, read back by
    load_labelled_folder (PNG is lossless, the layouts are written at the image size)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "layouts").mkdir(exist_ok=True)
    data, boxes = make_objects(n, image_size, seed=seed, with_boxes=True)
    names = [f"{i:05d}.png" for i in range(n)]
    for name, image, layout in zip(names, data.images, data.layouts):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / "images" / name)
        Image.fromarray(layout.numpy()).save(out / "layouts" / name)
    files = {"train.json": {name: [LABEL_NAMES[i] for i in row.nonzero().flatten().tolist()]
                            for name, row in zip(names, data.multilabels)},
             "objects.json": {name: i for i, name in enumerate(LABEL_NAMES)},
             "test.json": test_label_sets(False, seed), "new_test.json": test_label_sets(True, seed),
             "boxes.json": dict(zip(names, boxes))}
    for file_name, content in files.items():
        (out / file_name).write_text(json.dumps(content, indent=1))
    return out


# ----------------------------------------------------------------------------------------------
# Reading the formats
# ----------------------------------------------------------------------------------------------

def read_json(path, flag):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{flag} '{path}' does not exist; pass the path of the .json file") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{flag} '{path}' is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                        "fix the file") from None


def read_label_names(path):
    """objects.json: {name: index} with the indices 0 .. K-1 -> the names in index order."""
    names = read_json(path, "--label-names")
    if not isinstance(names, dict) or sorted(names.values()) != list(range(len(names))):
        raise UserError(f"--label-names '{path}' must map each label name to its index 0 .. K-1, once each")
    return sorted(names, key=names.get)


def label_indices(label_lists, names, source):
    """Label-name lists -> index lists; an unknown name is an error naming the file and the entry."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for key, labels in label_lists:
        unknown = [label for label in labels if label not in index]
        if unknown or not isinstance(labels, list):
            raise UserError(f"{source}: entry {key!r} names {unknown or labels!r}, which the label names "
                            f"(objects.json) do not have; fix the entry or add the label")
        out.append([index[label] for label in labels])
    return out


def read_layout(layouts, name, size, image_size, num_labels):
    """The layout of one image file (relative `name`, original `size`): a PNG map or the file's boxes,
    as (image_size, image_size) uint8, resized with nearest so values stay labels."""
    if isinstance(layouts, dict):   # boxes, rasterised at the image file's size
        layout = Image.new("L", size, 0)
        for entry in layouts.get(name, []):
            x0, y0, x1, y1, label = entry
            ImageDraw.Draw(layout).rectangle([x0, y0, x1 - 1, y1 - 1], fill=label + 1)
    else:
        path = Path(layouts) / name
        if not path.is_file():
            raise UserError(f"--layouts: no layout '{path}' for the image '{name}'; add it, or drop --layouts")
        with Image.open(path) as layout:
            layout = layout.convert("L") if layout.mode != "L" else layout.copy()
        if layout.size != size:
            raise UserError(f"--layouts: '{path}' is {layout.size[0]}x{layout.size[1]}, its image "
                            f"{size[0]}x{size[1]}; a layout must have its image's size")
    array = np.asarray(layout.resize((image_size, image_size), Image.NEAREST), dtype=np.uint8)
    if array.max() > num_labels:
        raise UserError(f"--layouts: the layout of '{name}' has the value {array.max()}, beyond the "
                        f"{num_labels} labels (values are 1 + a label's index, 0 the background)")
    return array


def load_labelled_folder(root, labels_json, names_json, layouts, image_size=32, channels=None,
                         cache_dir=None):
    """An image folder with multi-hot labels (train.json), layouts (a folder of maps or boxes .json) or both,
    and the label names (objects.json). The images are those the labels (else the boxes, else the folder) name,
    in that order; without labels, each image's labels are those its layout holds."""
    if names_json is None:
        raise UserError("--labels and --layouts need --label-names objects.json (label name -> index)")
    names, root = read_label_names(names_json), Path(root)
    label_lists = read_json(labels_json, "--labels") if labels_json else None
    if label_lists is not None and not isinstance(label_lists, dict):
        raise UserError(f"--labels '{labels_json}' must map image files to lists of label names, as train.json")
    boxes = None
    if layouts and str(layouts).endswith(".json"):
        boxes = read_json(layouts, "--layouts")
        for key, entries in boxes.items():
            label_indices([(key, [e[4] for e in entries])], names, f"--layouts '{layouts}'")
            boxes[key] = [[*e[:4], names.index(e[4])] for e in entries]
    if label_lists is not None:
        files = list(label_lists)
    elif boxes is not None:
        files = list(boxes)
    else:
        files = [str(p.relative_to(root)) for p in image_data.list_image_folder(root)[0]]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise UserError(f"{'--labels' if label_lists is not None else '--layouts'} names '{missing[0]}', which is "
                        f"not in '{root}' ({len(missing)} missing); fix the path or the file")
    images, kept = image_data.decode_cached(root, [root / f for f in files], list(range(len(files))), image_size,
                                            channels, cache_dir)
    kept_files = [files[i] for i in kept.tolist()]
    data = ImageData(images, torch.zeros(len(kept_files), dtype=torch.int64), [root.resolve().name], str(root),
                     names)
    if layouts:
        maps = []
        for name in kept_files:
            with Image.open(root / name) as img:
                size = img.size
            maps.append(read_layout(boxes if boxes is not None else layouts, name, size, image_size, len(names)))
        data.layouts = torch.from_numpy(np.stack(maps))
    if label_lists is not None:
        data.multilabels = multi_hot(label_indices([(f, label_lists[f]) for f in kept_files], names,
                                                   f"--labels '{labels_json}'"), len(names))
    else:   # the labels present in each layout
        present = torch.zeros(len(kept_files), len(names) + 1, dtype=torch.uint8)
        present.scatter_(1, data.layouts.flatten(1).long(), 1)
        data.multilabels = present[:, 1:].contiguous()
    return data


def read_layout_maps(path, image_size, num_labels):
    """Layouts to sample from: one PNG map, or every PNG in a folder (sorted by name) -> (N, S, S) uint8, each
    resized to the model's size with nearest."""
    path = Path(path)
    files = sorted(path.glob("*.png")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise UserError(f"--layouts '{path}' is neither a PNG map nor a folder of them")
    maps = []
    for file in files:
        with Image.open(file) as layout:
            array = np.asarray(layout.convert("L").resize((image_size, image_size), Image.NEAREST), dtype=np.uint8)
        if array.max() > num_labels:
            raise UserError(f"--layouts: '{file}' has the value {array.max()}, beyond the model's {num_labels} "
                            "labels (values are 1 + a label's index, 0 the background)")
        maps.append(array)
    return torch.from_numpy(np.stack(maps))


def read_test_labels(path, names):
    """test.json / new_test.json: a list of label-name lists -> (N, K) multi-hot, in the file's order."""
    label_lists = read_json(path, "--labels")
    if not isinstance(label_lists, list):
        raise UserError(f"--labels '{path}' must be a list of label-name lists, as test.json")
    return multi_hot(label_indices(list(enumerate(label_lists)), names, f"--labels '{path}'"), len(names))


def main(argv=None):
    parser = common.ArgumentParser(prog="scenes.py", description="Write the built-in `objects` data as files.")
    sub = parser.add_subparsers(dest="command", required=True)
    export_parser = sub.add_parser("export", help="images/, train.json, objects.json, test.json, new_test.json, "
                                   "layouts/ and boxes.json in OUT")
    export_parser.add_argument("out", help="the folder to write")
    export_parser.add_argument("--n", type=common.checked(int, 2), default=3000, help="images (default: 3000)")
    export_parser.add_argument("--image-size", type=common.checked(int, 8), default=32,
                               help="their size (default: 32)")
    export_parser.add_argument("--seed", type=common.checked(int, 0), default=0, help="the scenes' seed (default: 0)")
    args = parser.parse_args(argv)
    out = export(args.out, args.n, args.image_size, args.seed)
    print(f"wrote {args.n} scenes of {args.image_size}x{args.image_size} to {out}")


if __name__ == "__main__":
    common.run_cli(lambda: main(sys.argv[1:]))
