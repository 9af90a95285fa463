"""
The built-in `shapes` dataset: a pure function of (seed, sizes, rates), no download.

Each image has 1-3 objects on a 3x3 grid; each object has a colour, a shape and a compass
position. Every caption token carries its true class (what PRIOR hopes to find on its own):

    RELEVANT  only the image can tell it: count, colour, shape, position
    FILLER    the text alone predicts it: "in this picture we can see", "a", "at the"
    NOISE     nothing predicts it: "taken by Ana in Lima" (the paper's weak spot: PRIOR up-weights it)

Text prior trap: every shape has a favourite colour (p=0.6), and the colour comes before the
shape in the caption, so after "a red" the text alone says "circle" with high confidence,
right or wrong. The image decides.

`parse_objects` reads a caption back into (colour, shape, position) objects, for eval.py.
"""

import re

import numpy as np

from sources.tokenizer import get_tokenizer

FILLER, RELEVANT, NOISE = 0, 1, 2               # true token classes
CLASS_NAMES = ('filler', 'relevant', 'noise')

COLOURS = {'red': (220, 40, 40), 'green': (40, 190, 60), 'blue': (50, 90, 235),
           'yellow': (235, 220, 40), 'purple': (150, 50, 200), 'pink': (245, 130, 190)}
SHAPES = ('square', 'circle', 'triangle', 'cross')
FAVOURITE = {'square': 'blue', 'circle': 'red', 'triangle': 'green', 'cross': 'yellow'}
FAVOURITE_SHAPE = {colour: shape for shape, colour in FAVOURITE.items()}
FAVOURITE_P = 0.6
POSITIONS = ('northwest', 'north', 'northeast', 'west', 'center', 'east', 'southwest', 'south', 'southeast')
COUNTS = ('one', 'two', 'three')
ATTRIBUTES = {'count': COUNTS, 'colour': tuple(COLOURS), 'shape': SHAPES, 'position': POSITIONS}
ATTR_NAMES = tuple(ATTRIBUTES)                  # attribute id = index here

OPENERS = ('a photo of', 'in this picture we can see', 'this image shows', 'here we have',
           'the picture contains', 'we can see')
PREPOSITIONS = ('in the', 'at the', 'on the')
JOINERS = (' and', ', and', ', plus', ', as well as')
ASIDES = (', which is easy to see', ', clearly visible', ', drawn in a simple style')
NAMES = ('Ana', 'Ben', 'Chloe', 'David', 'Elena', 'Farid', 'Grace', 'Hiro', 'Ines', 'Jonas', 'Kemi',
         'Liam', 'Maya', 'Nikolai', 'Olga', 'Pablo', 'Quinn', 'Rosa', 'Sven', 'Tariq', 'Uma', 'Victor',
         'Wen', 'Ximena', 'Yusuf', 'Zoe', 'Arjun', 'Bianca', 'Carlos', 'Dana')
CITIES = ('Paris', 'Lima', 'Oslo', 'Cairo', 'Tokyo', 'Denver', 'Lagos', 'Quito', 'Hanoi', 'Porto',
          'Dublin', 'Kyoto', 'Austin', 'Nairobi', 'Seoul', 'Bergen', 'Perth', 'Lyon', 'Milan', 'Tunis',
          'Boston', 'Delhi', 'Riga', 'Sofia', 'Vienna', 'Zurich', 'Dakar', 'Havana', 'Osaka', 'Leeds')


def sample_scene(rng):
    """Objects of one image: a list of (colour, shape, position) with distinct positions, in reading
    order (northwest first), so the image alone decides which object a caption describes first."""
    count = int(rng.integers(1, 4))
    cells = np.sort(rng.choice(len(POSITIONS), size=count, replace=False))
    objects = []
    for cell in cells:
        shape = SHAPES[rng.integers(len(SHAPES))]
        if rng.random() < FAVOURITE_P:
            colour = FAVOURITE[shape]
        else:
            others = [c for c in COLOURS if c != FAVOURITE[shape]]
            colour = others[rng.integers(len(others))]
        objects.append((colour, shape, POSITIONS[cell]))
    return objects


def caption_segments(objects, rng, noise_rate, filler='default', caption_noise=0.0):
    """The caption as (text, class, attribute) segments; each segment owns its leading space.

    filler: 'default' (varied templates), 'low' ("we see two shapes: red circle north and
    ..."; about half as many filler tokens) or 'high' (default plus a filler clause per object).
    caption_noise: the paper's web-caption noise, text that fits the text prior but not the
    image: an object whose colour is some shape's favourite is, with this probability, called
    that shape ("a red circle" for a red square: after "red" the text expects "circle"); the
    wrong word is labelled NOISE."""
    pick = lambda options: options[rng.integers(len(options))]
    n, low = len(objects), filler == 'low'
    segs = [('we see' if low else pick(OPENERS), FILLER, None),
            (' ' + COUNTS[n - 1], RELEVANT, 'count'),
            (' shape:' if n == 1 else ' shapes:', FILLER, None)]
    for i, (colour, shape, position) in enumerate(objects):
        if i > 0:
            segs.append((' and' if low else pick(JOINERS), FILLER, None))
        if not low:
            segs.append((' a', FILLER, None))
        segs.append((' ' + colour, RELEVANT, 'colour'))
        expected = FAVOURITE_SHAPE.get(colour, shape)
        if caption_noise and expected != shape and rng.random() < caption_noise:
            segs.append((' ' + expected, NOISE, None))
        else:
            segs.append((' ' + shape, RELEVANT, 'shape'))
        if not low:
            segs.append((' ' + pick(PREPOSITIONS), FILLER, None))
        segs.append((' ' + position, RELEVANT, 'position'))
        if filler == 'high':
            segs.append((pick(ASIDES), FILLER, None))
    if rng.random() < noise_rate:
        segs += [(', taken by', FILLER, None), (' ' + pick(NAMES), NOISE, None),
                 (' in', FILLER, None), (' ' + pick(CITIES), NOISE, None)]
    segs.append(('.', FILLER, None))
    return segs


def label_tokens(segments):
    """Tokenize a caption and give each BPE token the class/attribute of the segment it starts in.

    Labels come from character spans, so they stay right whatever BPE does at segment
    boundaries. Returns (text, gpt2 tokens, classes, attribute ids (-1 = none))."""
    text = ''.join(s[0] for s in segments)
    char_class = np.empty(len(text), dtype=np.int8)
    char_attr = np.empty(len(text), dtype=np.int8)
    pos = 0
    for seg_text, cls, attr in segments:
        char_class[pos:pos + len(seg_text)] = cls
        char_attr[pos:pos + len(seg_text)] = -1 if attr is None else ATTR_NAMES.index(attr)
        pos += len(seg_text)
    enc = get_tokenizer()
    tokens = enc.encode(text)
    _, offsets = enc.decode_with_offsets(tokens)
    return text, tokens, char_class[offsets], char_attr[offsets]


def render(objects, rng, size, pixel_noise):
    """Draw the objects on a dark background with jitter and noise -> uint8 [3, size, size]."""
    cell = size / 3
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = rng.uniform(0, 60, size=3)          # background tint
    for colour, shape, position in objects:
        row, col = divmod(POSITIONS.index(position), 3)
        cy = (row + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        cx = (col + 0.5) * cell + rng.uniform(-0.12, 0.12) * cell
        r = cell * rng.uniform(0.30, 0.40)
        dy, dx = yy - cy, xx - cx
        if shape == 'square':
            mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
        elif shape == 'circle':
            mask = dx ** 2 + dy ** 2 <= r ** 2
        elif shape == 'triangle':                # apex up
            mask = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
        else:                                    # cross
            arm = r / 3
            mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
        img[mask] = np.asarray(COLOURS[colour]) + rng.uniform(-20, 20, size=3)
    img += rng.normal(0, pixel_noise * 255, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)


def make_shapes(n, seed, image_size, noise_rate, pixel_noise, filler='default', caption_noise=0.0):
    """n images with one caption each: (images uint8 [n,3,H,W], texts, GPT-2 tokens, token classes
    (with the closing EOT's), attribute ids, objects per image)."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, 3, image_size, image_size), dtype=np.uint8)
    texts, tokens, classes, attrs, scenes = [], [], [], [], []
    for i in range(n):
        objects = sample_scene(rng)
        text, toks, cls, att = label_tokens(caption_segments(objects, rng, noise_rate, filler, caption_noise))
        images[i] = render(objects, rng, image_size, pixel_noise)
        cls = np.append(cls, FILLER)             # the closing EOT: predictable filler
        texts.append(text), tokens.append(toks), classes.append(cls), attrs.append(att), scenes.append(objects)
    return images, texts, tokens, classes, attrs, scenes


OBJECT_RE = re.compile(r"\b({})\s+({})\s+(?:(?:in|at|on)\s+(?:the\s+)?)?({})\b".format(
    '|'.join(COLOURS), '|'.join(SHAPES), '|'.join(POSITIONS)))


def parse_objects(text):
    """The (colour, shape, position) objects a caption describes, in order."""
    return [m.groups() for m in OBJECT_RE.finditer(text)]
