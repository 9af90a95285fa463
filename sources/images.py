"""
Image files: checked before any training without trusting them, then decoded on demand.

Checks, cheapest first: the path stays inside the image folder (unless --confine_images=False);
the file exists, is not empty, is a format torchvision decodes (JPEG, PNG, GIF, WebP) with its
end marker, and declares at most --max_image_pixels pixels in its header (decompression bombs);
then every distinct image is decoded once, in a child process with a memory cap, so that a file
the decoder fails or even crashes on (libpng does, on damaged PNG data) is named up front and
never kills the run. That pass also takes each file's sha256: the images' fingerprint is their
content, and a file deleted, cut short or replaced after the check is caught before it is decoded
(one line naming it, or with --skip_bad a counted skip). No byte of a refused file is ever printed.
"""

import contextlib
import faulthandler
import hashlib
import mmap
import multiprocessing
import os
import re
import resource
import signal
import struct
import sys

import torch

from runs.errors import ConfigError

IMAGE_MAGIC = ((b'\xff\xd8\xff', 'jpeg'), (b'\x89PNG\r\n\x1a\n', 'png'), (b'GIF87a', 'gif'), (b'GIF89a', 'gif'),
               (b'RIFF', 'webp'))                # the formats torchvision.io.decode_image reads


class BadData(ConfigError):
    """A problem with the data on disk (a row, a caption, an image), named with its file and row."""


def image_path_problem(root, image, confine):
    """(path, None) for an image name inside the image folder `root`, else (None, (kind, message))."""
    if not isinstance(image, str):
        return None, ('bad_image_name', f"image name is a {type(image).__name__}, not text")
    if '\0' in image:
        return None, ('bad_image_name', "image name contains a NUL character")
    path = os.path.join(root, image)
    real_root = os.path.realpath(root)
    if confine and os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        return None, ('outside_root', f"image {image!r} leads outside the image folder {root} (../, an absolute "
                                      f"path or a symlink); --confine_images=False allows it")
    return path, None


def declared_size(f, kind):
    """(width, height) that an image file's header declares, or None if its header is unreadable."""
    head = f.read(30)
    if kind == 'png':
        return struct.unpack('>II', head[16:24]) if head[12:16] == b'IHDR' else None
    if kind == 'gif':
        return struct.unpack('<HH', head[6:10]) if len(head) >= 10 else None
    if kind == 'webp':
        chunk, body = head[12:16], head[20:30]
        if chunk == b'VP8X' and len(body) == 10:
            return 1 + int.from_bytes(body[4:7], 'little'), 1 + int.from_bytes(body[7:10], 'little')
        if chunk == b'VP8L' and len(body) >= 5:
            bits = int.from_bytes(body[1:5], 'little')
            return 1 + (bits & 0x3fff), 1 + (bits >> 14 & 0x3fff)
        if chunk == b'VP8 ' and len(body) == 10:
            return int.from_bytes(body[6:8], 'little') & 0x3fff, int.from_bytes(body[8:10], 'little') & 0x3fff
        return None
    pos = 2                                      # JPEG: walk the segments to the frame header (SOFn)
    while True:
        f.seek(pos)
        seg = f.read(9)
        if len(seg) < 4 or seg[0] != 0xFF or seg[1] == 0xDA:            # no SOF before the scan data
            return None
        if seg[1] in (0xFF, 0x01) or 0xD0 <= seg[1] <= 0xD8:           # fill byte, markers without length
            pos += 1 if seg[1] == 0xFF else 2
        elif 0xC0 <= seg[1] <= 0xCF and seg[1] not in (0xC4, 0xC8, 0xCC):
            return (struct.unpack('>H', seg[7:9])[0], struct.unpack('>H', seg[5:7])[0]) if len(seg) == 9 else None
        else:
            pos += 2 + struct.unpack('>H', seg[2:4])[0]


def image_problem(path, max_pixels):
    """None if the file looks like a whole image of a format torchvision decodes, no larger than
    max_pixels, else (kind, message). Reads its header and last 32 bytes; never prints them."""
    if not os.path.isfile(path):
        return 'missing_image', "image file does not exist"
    size = os.path.getsize(path)
    if size == 0:
        return 'empty_image', "image file is empty (0 bytes)"
    with open(path, 'rb') as f:
        head = f.read(16)
        kind = next((k for magic, k in IMAGE_MAGIC if head.startswith(magic)), None)
        if kind is None or (kind == 'webp' and head[8:12] != b'WEBP'):
            return 'not_an_image', "not a JPEG, PNG, GIF or WebP file (the formats torchvision decodes)"
        f.seek(0)
        dims = declared_size(f, kind)
        f.seek(max(0, size - 32))
        tail = f.read()
    if kind == 'jpeg' and b'\xff\xd9' not in tail:
        return 'truncated_image', "JPEG without its end marker (truncated?)"
    if kind == 'png' and b'IEND' not in tail:
        return 'truncated_image', "PNG without its IEND chunk (truncated?)"
    if dims is None or min(dims) == 0:
        return 'bad_header', f"{kind.upper()} header without a readable, non-zero image size"
    if dims[0] * dims[1] > max_pixels:
        return 'too_large', (f"declares {dims[0]}x{dims[1]} = {dims[0] * dims[1]:,} pixels, more than "
                             f"max_image_pixels {max_pixels:,}")
    return None


class ImageChanged(Exception):
    """An image file's content is not what the start-up check read."""


def file_bytes(path, digest=None):
    """The bytes of an image file; ImageChanged if `digest` is given and their sha256 differs."""
    with open(path, 'rb') as f:
        raw = f.read()
    if digest is not None and hashlib.sha256(raw).hexdigest() != digest:
        raise ImageChanged(path)
    return raw


def torchvision_io():
    """torchvision.io, imported on first use rather than at the top: torchvision takes over a second to
    import (it pulls in torch._dynamo), and the built-in data, which most runs and tests use, never needs it."""
    import torchvision.io
    return torchvision.io


def decode(path, raw=None):
    """An image file (or its bytes `raw`) as uint8 RGB [3,H,W] (grey, RGBA, palette, CMYK, 16-bit too;
    an animation's first frame)."""
    io = torchvision_io()
    raw = file_bytes(path) if raw is None else raw
    image = io.decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=io.ImageReadMode.RGB)
    return image[0] if image.dim() == 4 else image


def _decode_each(paths, conn, memory):
    """Child process: decode each path, sending (index, error message or None, sha256 of the file) after each."""
    torch.set_num_threads(1)
    faulthandler.disable()                                  # a crash here is expected, and reported by the parent
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)            # the decoders' own chatter; errors come back below
    with contextlib.suppress(OSError, ValueError):          # a memory cap where the OS has one
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = os.sysconf('SC_PAGE_SIZE') * int(open('/proc/self/statm').read().split()[0])
        resource.setrlimit(resource.RLIMIT_AS, (used + memory, hard))
    for i, path in enumerate(paths):
        digest = None
        try:
            raw = file_bytes(path)
            digest = hashlib.sha256(raw).hexdigest()
            decode(path, raw)
            conn.send((i, None, digest))
        except Exception as e:
            conn.send((i, decode_error(e), digest))
    conn.close()


def decode_error(e):
    """A decoder's exception in a few words: torchvision's messages start with its C++ source line
    (not the user's business), and running out of the child's memory cap is said plainly."""
    text = re.sub(r'^\w+, \S+:\d+, ', '', str(e)).strip()
    if "can't allocate memory" in text or 'bad_alloc' in text or isinstance(e, MemoryError):
        text = "decoding it needs more memory than max_image_pixels allows (many animation frames?)"
    return text[:200] or type(e).__name__


def undecodable(paths, max_pixels):
    """({path: message} of the files torchvision cannot decode, {path: sha256} of the others), each
    tried once in a child process: a decoder crash takes down only the child and names the file it
    was on; the next child carries on after that file. The child's memory is capped near what max_pixels needs."""
    torchvision_io()                             # before the fork: not again in each child, under its memory cap
    fork = multiprocessing.get_context('fork')
    problems, digests, start = {}, {}, 0
    while start < len(paths):
        receive, send = fork.Pipe(duplex=False)
        child = fork.Process(target=_decode_each, args=(paths[start:], send, (1 << 30) + 32 * max_pixels),
                             daemon=True)
        child.start()
        send.close()
        done = start
        with receive, contextlib.suppress(EOFError):
            while True:
                i, message, digest = receive.recv()
                if message:
                    problems[paths[start + i]] = message
                else:
                    digests[paths[start + i]] = digest
                done = start + i + 1
        child.join()
        if child.exitcode and done < len(paths):
            how = signal.Signals(-child.exitcode).name if child.exitcode < 0 else f"exit code {child.exitcode}"
            problems[paths[done]] = f"the image decoder crashed on it: {how}"
            done += 1
        start = done
    return problems, digests


def checked_images(paths, size, max_pixels):
    """ImageFiles of image files a user names (sample.py), checked as training checks its data: the
    header (format, whole, at most max_pixels), then a decode in a child process; BadData naming the
    first bad file. Each is then read only if its content is still what the check decoded."""
    for path in paths:
        problem = image_problem(path, max_pixels)
        if problem:
            raise BadData(f"image {path}: {problem[1]}")
    broken, digests = undecodable(list(dict.fromkeys(paths)), max_pixels)
    for path in paths:
        if path in broken:
            raise BadData(f"image {path} cannot be decoded ({broken[path]})")
    return ImageFiles(paths, size, [digests[p] for p in paths])


def shared_tensor(shape, dtype):
    """Zeros in memory that forked processes (DataLoader workers) share with this one, taken from
    the OS page by page as they are written."""
    n = max(1, int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size())
    return torch.frombuffer(mmap.mmap(-1, n), dtype=dtype)[:torch.Size(shape).numel()].view(shape)


DECODED, BROKEN = 1, 2                           # ImageFiles.state of an image (0: not read yet)


class ImageFiles:
    """Images decoded on demand (decode() above), resized (shorter side) and centre-cropped to
    size x size, as uint8 [3,H,W]. Each image is decoded once: small datasets (up to 2 GiB of
    pixels) keep them in memory shared with the DataLoader workers, so neither another epoch nor
    another worker decodes an image again, and the memory is not multiplied by the workers.
    With `digests` (sha256 per file, from the start-up check) a file that changed since is never
    decoded: BadData names it, or with `skip_bad` it reads as black, is counted in `state` (BROKEN,
    shared with the workers too) and CaptionData drops its caption tokens from the loss."""

    def __init__(self, paths, size, digests=None, skip_bad=False):
        from torchvision.transforms import v2       # on first use, as torchvision_io()
        self.paths, self.size, self.digests, self.skip_bad = paths, size, digests, skip_bad
        self.transform = v2.Compose([v2.ToDtype(torch.uint8, scale=True), v2.Resize(size, antialias=True),
                                     v2.CenterCrop(size)])
        fits = len(paths) * 3 * size * size < 2 ** 31
        self.pixels = shared_tensor((len(paths), 3, size, size), torch.uint8) if fits else None
        self.state = shared_tensor((len(paths),), torch.uint8)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.state[i] == DECODED and self.pixels is not None:
            return self.pixels[i].clone()
        try:
            raw = file_bytes(self.paths[i], self.digests and self.digests[i])
            image = self.transform(decode(self.paths[i], raw))
        except Exception as e:
            problem = ('was deleted' if isinstance(e, FileNotFoundError) else 'changed' if isinstance(e, ImageChanged)
                       else f'cannot be read ({decode_error(e)})')
            problem += ' since the start-up check' if self.digests else ''
            if not self.skip_bad:
                hint = '; restore it or pass --skip_bad=True' if self.digests else ''
                raise BadData(f"image {self.paths[i]} {problem}{hint}") from None
            if self.state[i] != BROKEN:
                self.state[i] = BROKEN
                print(f"data: skipping image {self.paths[i]}: it {problem}", file=sys.stderr)
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8)
        if self.pixels is not None:
            self.pixels[i] = image
            self.state[i] = DECODED
        return image

    def broken(self, indices=slice(None)):
        """A bool mask: which of these images (all by default) went bad during the run (skipped with skip_bad)."""
        return self.state[indices] == BROKEN


def to_unit_range(images):
    """uint8 pixels [..., 3, H, W] as float in [-1, 1], the range every vision model here reads."""
    return images.float().div_(127.5).sub_(1.0)


def report_broken(images, log):
    """One line counting the training images that went bad during the run (skipped with --skip_bad), if any."""
    if isinstance(images, ImageFiles) and images.broken().any():
        log(f"data: skipped {int(images.broken().sum())} training images that went bad during the run "
            f"(--skip_bad; their captions did not train)")
