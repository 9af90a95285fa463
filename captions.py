"""
Real image-caption data from disk, in four formats (detected from --dataset=PATH):

  folder      PATH/captions.csv (header `image,caption`) or PATH/captions.jsonl
              ({"image": ..., "caption": ...} per line); images in PATH/images/ or PATH/
              (Flickr8k, CC3M-style dumps)
  COCO        captions_*.json: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
  LLaVA       blip_laion_cc_sbu_558k.json style: [{"image": ..., "conversations":
              [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": CAPTION}]}]
  (a .csv or .jsonl file directly works too)

Everything is checked up front, before any training, cheaply (no full decode): each row's
shape and text, each image file's existence, size, magic bytes and end marker. By default the
first problems stop the run with the file, the row and what is wrong; with --skip_bad the bad
entries are skipped and counted by kind. Nothing is dropped silently. (A file whose header
and end marker are right but whose body is corrupt passes this check; decoding it later
stops the run with its path.)

Splits are by image (a hash of its file name), so all captions of one image land in one split.
"""

import csv
import hashlib
import json
import os
from collections import Counter

import torch

from progress import Progress

IMAGE_MAGIC = ((b'\xff\xd8\xff', 'jpeg'), (b'\x89PNG\r\n\x1a\n', 'png'), (b'GIF87a', 'gif'), (b'GIF89a', 'gif'),
               (b'BM', 'bmp'), (b'RIFF', 'webp'))
MAX_LISTED = 10                                  # problems spelled out in the error message


class BadData(ValueError):
    pass


# ---- reading the four formats: each yields (image path relative to the root, caption, where) ----

def _lines(path):
    """(line number, text, problem) of every line, a UTF-8 byte-order mark dropped. A line that is
    not UTF-8 is decoded with replacement characters (so the rows around it still parse) and
    carries the problem; the row that contains it is then reported and skipped."""
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode('utf-8-sig' if n == 1 else 'utf-8'), None
            except UnicodeDecodeError as e:
                yield n, raw.decode('utf-8', errors='replace'), f"not UTF-8 ({e.reason} at byte {e.start})"


def read_csv(path, problems):
    """Rows of a CSV file parsed as a whole, so a quoted caption may span lines."""
    lines = list(_lines(path))
    reader = csv.reader((text for _, text, _ in lines), strict=True)   # line_num counts these lines
    header, last_line = None, 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:                   # broken quoting: the rows after it cannot be trusted
            raise BadData(f"{path} line {last_line + 1}: malformed CSV ({e})") from e
        first_line, last_line = last_line + 1, reader.line_num
        where = f"{path} line {first_line}" + (f"-{last_line}" if last_line > first_line else '')
        if not row or (len(row) == 1 and not row[0].strip()):          # a blank line
            continue
        bad = next((p for _, _, p in lines[first_line - 1:last_line] if p), None)
        if bad:
            problems.append(('invalid_utf8', where, bad))
            continue
        if header is None:
            header = row
            if [h.strip() for h in header] != ['image', 'caption']:
                raise BadData(f"{where}: the header must be 'image,caption', found {','.join(row)!r}")
            continue
        if len(row) != 2:
            problems.append(('malformed_row', where, f"expected 2 fields (image,caption), found {len(row)}"))
            continue
        yield row[0], row[1], where


def read_jsonl(path, problems):
    for n, line, bad in _lines(path):
        where = f"{path} line {n}"
        if bad:
            problems.append(('invalid_utf8', where, bad))
            continue
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(('malformed_row', where, f"not JSON ({e.msg})"))
            continue
        if not isinstance(entry, dict) or not entry.get('image'):
            problems.append(('no_image', where, "entry has no 'image'"))
            continue
        yield entry['image'], entry.get('caption'), where


def _load_json(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except UnicodeDecodeError as e:
        raise BadData(f"{path}: not UTF-8 at byte {e.start}")
    except json.JSONDecodeError as e:
        raise BadData(f"{path}: not valid JSON (line {e.lineno}: {e.msg})")


def read_coco(data, name, problems):
    if not isinstance(data['annotations'], list) or not isinstance(data.get('images', []), list):
        raise BadData(f"{name}: 'annotations' and 'images' must be lists")
    files = {img.get('id'): img.get('file_name') for img in data.get('images', []) if isinstance(img, dict)}
    for n, ann in enumerate(data['annotations']):
        where = f"{name} annotation {n}"
        if not isinstance(ann, dict):
            problems.append(('malformed_row', where, f"annotation is a {type(ann).__name__}, not an object"))
            continue
        file_name = files.get(ann.get('image_id'))
        if not file_name:
            problems.append(('no_image', where, f"image_id {ann.get('image_id')!r} is not in 'images'"))
            continue
        yield file_name, ann.get('caption'), where


def read_llava(data, name, problems):
    for n, entry in enumerate(data):
        where = f"{name} entry {n}"
        if not isinstance(entry, dict) or not entry.get('image'):
            problems.append(('no_image', where, "entry has no 'image'"))
            continue
        turns = entry.get('conversations') or []
        caption = next((t.get('value') for t in turns if isinstance(t, dict) and t.get('from') == 'gpt'), None)
        yield entry['image'], caption, where


def detect(path, image_root=''):
    """(format, rows reader, image root) for a dataset path."""
    if os.path.isdir(path):
        for file_name, kind in (('captions.csv', 'csv'), ('captions.jsonl', 'jsonl')):
            if os.path.isfile(os.path.join(path, file_name)):
                default_root = os.path.join(path, 'images') if os.path.isdir(os.path.join(path, 'images')) else path
                return kind, os.path.join(path, file_name), image_root or default_root
        raise BadData(f"{path}: no captions.csv or captions.jsonl in this folder")
    if not os.path.isfile(path):
        raise BadData(f"dataset {path!r} does not exist (a folder, a .csv/.jsonl, or a COCO/LLaVA .json)")
    root = image_root or os.path.dirname(path)
    if path.endswith('.csv'):
        return 'csv', path, root
    if path.endswith('.jsonl'):
        return 'jsonl', path, root
    if path.endswith('.json'):
        data = _load_json(path)
        if isinstance(data, dict) and 'annotations' in data:
            return 'coco', data, root
        if isinstance(data, list):
            return 'llava', data, root
        raise BadData(f"{path}: JSON that is neither COCO captions (with 'annotations') nor LLaVA (a list)")
    raise BadData(f"{path}: unknown dataset format (expected a folder, .csv, .jsonl or .json)")


# ---- checking images without decoding them ----

def image_problem(path):
    """None if the file looks like a whole image, else (kind, message). Reads ~40 bytes."""
    if not os.path.isfile(path):
        return 'missing_image', "image file does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return 'empty_image', "image file is empty (0 bytes)"
    with open(path, 'rb') as f:
        head = f.read(16)
        f.seek(max(0, size - 32))
        tail = f.read()
    kind = next((k for magic, k in IMAGE_MAGIC if head.startswith(magic)), None)
    if kind is None:
        return 'not_an_image', f"not an image (starts with {head[:8]!r})"
    if kind == 'jpeg' and b'\xff\xd9' not in tail:
        return 'truncated_image', "JPEG without its end marker (truncated?)"
    if kind == 'png' and b'IEND' not in tail:
        return 'truncated_image', "PNG without its IEND chunk (truncated?)"
    return None


def read_records(path, image_root='', skip_bad=False, log=print):
    """Validated (image path, caption) pairs of a dataset. Raises BadData naming the file and
    row of the first problems, or (skip_bad) skips them and logs how many of each kind."""
    fmt, source, root = detect(path, image_root)
    if not os.path.isdir(root):
        raise BadData(f"image folder {root!r} does not exist (set --image_root)")
    problems = []
    rows = {'csv': read_csv, 'jsonl': read_jsonl}[fmt](source, problems) if fmt in ('csv', 'jsonl') else \
        {'coco': read_coco, 'llava': read_llava}[fmt](source, path, problems)
    records, seen, checked = [], set(), {}
    total = {'coco': lambda: len(source['annotations']), 'llava': lambda: len(source)}.get(fmt, lambda: None)()
    progress = Progress(total)                   # speaks only on datasets that take seconds to check
    for image, caption, where in rows:
        if progress.due():
            log(f"data: checking {path}: {progress.line(len(records) + len(problems))} entries")
        if caption is None:
            problems.append(('no_caption', where, "entry has no caption"))
            continue
        if not isinstance(caption, str):
            problems.append(('bad_caption', where, f"caption is a {type(caption).__name__}, not text"))
            continue
        caption = caption.strip()
        if not caption:
            problems.append(('empty_caption', where, "caption is empty or whitespace"))
            continue
        image_path = os.path.join(root, image)
        if image_path not in checked:
            checked[image_path] = image_problem(image_path)
        if checked[image_path]:
            kind, message = checked[image_path]
            problems.append((kind, where, f"{message}: {image_path}"))
            continue
        if (image, caption) in seen:
            problems.append(('duplicate', where, f"same image and caption as an earlier row ({image})"))
            continue
        seen.add((image, caption))
        records.append((image_path, caption))
    if problems and not skip_bad:
        listed = '\n'.join(f"  {where}: {message}" for _, where, message in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ''
        raise BadData(f"{len(problems)} bad entries in {path} ({dict(Counter(k for k, _, _ in problems))}):\n"
                      f"{listed}{more}\nFix them, or pass --skip_bad=True to skip and count them.")
    if problems:
        log(f"data: skipped {len(problems)} bad entries of {path}: {dict(Counter(k for k, _, _ in problems))}")
    if not records:
        raise BadData(f"{path}: no usable image-caption pairs")
    log(f"data: {fmt} dataset {path}: {len(records)} captions of {len({r[0] for r in records})} images")
    return records


def split_of(image_path, val_frac, test_frac):
    """'train', 'val' or 'test' from a hash of the image's file name: stable across runs and machines."""
    u = int(hashlib.sha1(os.path.basename(image_path).encode()).hexdigest()[:8], 16) / 16 ** 8
    return 'val' if u < val_frac else 'test' if u < val_frac + test_frac else 'train'


class ImageFiles:
    """Images decoded on demand with torchvision, converted to RGB (grey, RGBA, palette, CMYK,
    16-bit too), resized (shorter side) and centre-cropped to size x size, as uint8 [3,H,W].
    Small datasets are kept in memory once decoded, by the main process only: DataLoader workers
    each hold a copy of this object, and a cache in each would multiply the memory by their number."""

    def __init__(self, paths, size):
        from torchvision.transforms import v2
        self.paths, self.size = paths, size
        self.transform = v2.Compose([v2.ToDtype(torch.uint8, scale=True), v2.Resize(size, antialias=True),
                                     v2.CenterCrop(size)])
        self.cache = {} if len(paths) * 3 * size * size < 2 ** 31 else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        from torchvision.io import ImageReadMode, decode_image
        try:
            image = self.transform(decode_image(self.paths[i], mode=ImageReadMode.RGB))
        except Exception as e:
            raise BadData(f"cannot decode image {self.paths[i]}: {e}") from e
        if self.cache is not None and torch.utils.data.get_worker_info() is None:
            self.cache[i] = image
        return image
