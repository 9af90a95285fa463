"""
Real image-caption data from disk, in four formats (detected from --dataset=PATH):

  folder      PATH/captions.csv (header `image,caption`) or PATH/captions.jsonl
              ({"image": ..., "caption": ...} per line); images in PATH/images/ or PATH/
              (Flickr8k, CC3M-style dumps)
  COCO        captions_*.json: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}
  LLaVA       blip_laion_cc_sbu_558k.json style: [{"image": ..., "conversations":
              [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": CAPTION}]}]
  (a .csv or .jsonl file directly works too)

Everything is checked up front, before any training: each row's shape, types and text; each
image path stays inside the image folder (unless --confine_images=False); each image file's
existence, size, format (one torchvision decodes), end marker and declared pixel count (at most
--max_image_pixels); then every distinct image is decoded once, in a child process, so that a
file the decoder fails or even crashes on (libpng does, on damaged PNG data) is named here and
not in the middle of training. By default the first problems stop the run with the file, the
row and what is wrong; with --skip_bad the bad entries are skipped and counted by kind. Nothing
is dropped silently, and no byte of a refused file is printed.

Splits are by image (a hash of its path relative to the image folder: `ID/image.png` layouts
split too), so all captions of one image land in one split.
"""

import csv
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass

from runs.errors import ConfigError
from runs.progress import Progress
from sources.images import BadData, image_path_problem, image_problem, undecodable
from sources.tokenizer import get_tokenizer

MAX_LISTED = 10                                  # problems spelled out in the error message


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
        with open(path, encoding='utf-8-sig') as f:           # a leading BOM is read past, as in CSV and JSONL
            return json.load(f)
    except UnicodeDecodeError as e:
        raise BadData(f"{path}: not UTF-8 at byte {e.start}")
    except json.JSONDecodeError as e:
        raise BadData(f"{path}: not valid JSON (line {e.lineno}: {e.msg})")


def read_coco(data, name, problems):
    if not isinstance(data['annotations'], list) or not isinstance(data.get('images', []), list):
        raise BadData(f"{name}: 'annotations' and 'images' must be lists")
    files = {img['id']: img.get('file_name') for img in data.get('images', [])
             if isinstance(img, dict) and isinstance(img.get('id'), (int, str))}
    for n, ann in enumerate(data['annotations']):
        where = f"{name} annotation {n}"
        if not isinstance(ann, dict):
            problems.append(('malformed_row', where, f"annotation is a {type(ann).__name__}, not an object"))
            continue
        if not isinstance(ann.get('image_id'), (int, str)):
            problems.append(('malformed_row', where, f"image_id is a {type(ann.get('image_id')).__name__}, "
                                                     f"not a number or text"))
            continue
        file_name = files.get(ann['image_id'])
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
        if not isinstance(turns, list):
            problems.append(('malformed_row', where, f"'conversations' is a {type(turns).__name__}, not a list"))
            continue
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


class Records(list):
    """(image path, caption) pairs, with the image folder they are in (`root`) and the sha256 of
    each image file as the start-up check read it (`digests`, {path: sha256})."""

    def __init__(self, pairs, root, digests):
        super().__init__(pairs)
        self.root, self.digests = root, digests


def read_records(path, image_root='', skip_bad=False, log=print, confine=True, max_pixels=89_478_485):
    """Validated (image path, caption) pairs of a dataset, as Records. Raises BadData naming the file
    and row of the first problems, or (skip_bad) skips them and logs how many of each kind."""
    fmt, source, root = detect(path, image_root)
    if not os.path.isdir(root):
        raise BadData(f"image folder {root!r} does not exist (set --image_root)")
    problems = []
    rows = {'csv': read_csv, 'jsonl': read_jsonl}[fmt](source, problems) if fmt in ('csv', 'jsonl') else \
        {'coco': read_coco, 'llava': read_llava}[fmt](source, path, problems)
    found, seen, checked = [], set(), {}
    entries = source['annotations'] if fmt == 'coco' else source if fmt == 'llava' else None
    total = len(entries) if isinstance(entries, list) else None                  # for the progress line
    progress = Progress(total)                   # speaks only on datasets that take seconds to check
    for image, caption, where in rows:
        if progress.due():
            log(f"data: checking {path}: {progress.line(len(found) + len(problems))} entries")
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
        image_path, problem = image_path_problem(root, image, confine)
        if problem:
            problems.append((problem[0], where, problem[1]))
            continue
        if image_path not in checked:
            checked[image_path] = image_problem(image_path, max_pixels)
        if checked[image_path]:
            kind, message = checked[image_path]
            problems.append((kind, where, f"{message}: {image_path}"))
            continue
        if (image, caption) in seen:
            problems.append(('duplicate', where, f"same image and caption as an earlier row ({image})"))
            continue
        seen.add((image, caption))
        found.append((image_path, caption, where))
    broken, digests = undecodable(sorted({p for p, _, _ in found}), max_pixels)
    problems += [('undecodable', where, f"cannot be decoded ({broken[p]}): {p}")
                 for p, _, where in found if p in broken]
    records = Records([(p, caption) for p, caption, _ in found if p not in broken], root, digests)
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


def split_of(key, val_frac, test_frac):
    """'train', 'val' or 'test' from a hash of `key`, the image's path relative to the image folder:
    stable across runs, machines and places of the dataset."""
    u = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16 ** 8
    return 'val' if u < val_frac else 'test' if u < val_frac + test_frac else 'train'


@dataclass
class Split:
    """One split of a dataset on disk: its image files, each caption's image (an index into paths),
    the captions and their GPT-2 tokens, and each image file's sha256 from the start-up check."""
    paths: list
    image_index: list
    texts: list
    tokens: list
    digests: list


def caption_splits(cfg, names, log=print):
    """The named splits ('train', 'val', 'test' by a hash of each image's path, or 'all') of the
    dataset cfg.dataset, checked by read_records; over-long captions are cut to block_size - 1
    tokens (the closing EOT fits) and counted."""
    records = read_records(cfg.dataset, cfg.image_root, cfg.skip_bad, log, cfg.confine_images, cfg.max_image_pixels)
    enc, limit = get_tokenizer(), cfg.block_size - 1
    by_split = {name: [] for name in names}
    for image_path, caption in records:
        key = os.path.relpath(image_path, records.root)
        split = 'all' if names == ('all',) else split_of(key, cfg.val_frac, cfg.test_frac)
        if split in by_split:
            by_split[split].append((image_path, caption))
    out, cut = {}, 0
    for name, recs in by_split.items():
        if not recs:
            raise ConfigError(f"split {name!r} of {cfg.dataset} is empty (val_frac={cfg.val_frac}, "
                              f"test_frac={cfg.test_frac})")
        paths = sorted({p for p, _ in recs})
        where = {p: i for i, p in enumerate(paths)}
        tokens = enc.encode_ordinary_batch([c for _, c in recs])
        cut += sum(len(t) > limit for t in tokens)
        out[name] = Split(paths, [where[p] for p, _ in recs], [c for _, c in recs], [t[:limit] for t in tokens],
                          [records.digests[p] for p in paths])
    if cut:
        log(f"data: {cut} captions longer than block_size {cfg.block_size} were truncated to {limit} tokens + EOT")
    return out
