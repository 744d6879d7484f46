"""Generate the project's sample alt-text corpus: drawn images, posts, noisy SFT and preference data.

    python scripts/make_sample_data.py --out data/sample --seed 0 [--figure images/sample_records.png]

Writes, under ``--out`` (which is also the image folder of all four files)::

    pretrain.json     caption records for stage 1 (projector alignment), LLaVA's pre-training format
    sft.json          LLaVA conversation records (noisy, user-written-style targets)
    preference.json   preference records, format A (``text`` is a JSON string), + ``rejected_kind``
    test.jsonl        test records, format T, + ``key_facts`` and ``context_terms``
    pretrain/ sft/ pref/ test/  the images, square RGB PNGs drawn here with PIL

Every image holds two salient things, drawn at random: two groups of shapes (left and right),
a bar chart and a sign (side by side), or a sign above a row of shapes. The post decides which
of the two the alt-text must describe, and only the pixels tell what it looks like (colour,
count, shape, which bar is tallest). So neither a context-only nor an image-only writer can
get the alt-text right. The visual facts are coarse on purpose: a tiny randomly initialised
LLaVA (patch 14 on 112 px) can learn them on a CPU in minutes.

Captions state every visual fact of both things, with no regard to any post (stage 1 teaches
the model to read the image, as LLaVA's caption pre-training does). SFT targets are noisy the way
user-written alt-text is; preference pairs pair a correct,
focused, concise alt-text with a realistic bad one (generic, wrong in one visual detail,
about the other thing, or a long caption). The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

QUESTION_PREFIX = "Given an image and context, generate alt-text for the image.\nContext:\n"
DS_NAME = "sample_alt_text"
ORIGIN_DATASET = "SampleAltText"

# A small palette of clearly distinct flat colours (name -> RGB); the order is fixed. Four, not
# six: with purple and orange too, the demo's SFT model named the focus thing's colour right in
# half of the test records (README, "What `make demo` shows").
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 80, 220),
    "green": (30, 160, 60),
    "yellow": (240, 200, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
GROUP_COUNTS = (1, 2, 3)  # shapes in a group (a chart has 2-4 bars)
SIGN_SHAPES = ("round", "square")
BACKGROUNDS = (("white", (255, 255, 255)), ("light gray", (232, 232, 232)), ("cream", (250, 243, 224)))
METRICS = ("orders", "visitors", "downloads", "votes")
# Side of a shape on the 112-unit canvas: 2 patches of 14 px. At 22 (1.6 patches) with up to four
# shapes a group, a linear probe of the demo tower told the shapes apart in only 78% of test images
# and the SFT model named a group's count, colour and shape together in 3 of 95.
SHAPE_SIZE = 28.0
INK = (70, 70, 70)
POLE = (120, 120, 120)

# What a sign says, and how a post about that sign puts it.
SIGN_WORDS: dict[str, tuple[str, ...]] = {
    "OPEN": ("We are open again!", "Good news, the shop is open."),
    "SALE": ("Big sale this weekend!", "Everything must go."),
    "STOP": ("Please drive slowly near the school.", "Careful at this corner."),
    "EXIT": ("Finally found the way out.", "The way out is this way."),
    "SOLD": ("We sold our old house!", "The old house is gone, finally."),
    "HELLO": ("Say hello to our new neighbours!", "A warm welcome at the door."),
}
SIGN_WORD_LIST = tuple(SIGN_WORDS)

SCENE_KINDS = ("shapes_lr", "chart_sign", "sign_shapes")
# The two things in each kind of scene; the post is about one of them (the "focus").
FOCI = {"shapes_lr": ("left", "right"), "chart_sign": ("chart", "sign"), "sign_shapes": ("sign", "bottom")}
LOCATIONS = {"left": "on the left", "right": "on the right", "bottom": "at the bottom"}

# ---------------------------------------------------------------- posts (the context)
SIDE_POSTS = (
    "Made stickers with my kids today. The ones on the {side} are my favourite!",
    "Trying out a new logo. What do you think of the {side} side?",
    "Art class homework: I drew the shapes on the {side} myself.",
    "My daughter sorted her blocks. She picked the ones on the {side}.",
    "Which looks better? I vote for the {side} side.",
    "Quick sketch for the poster. Look at the shapes on the {side}.",
)
BOTTOM_POSTS = (
    "The kids added some shapes at the bottom of our poster. Cute!",
    "Look at the shapes along the bottom of this picture.",
    "Art class homework: I drew the shapes at the bottom myself.",
    "Love the little shapes at the bottom of the new flyer.",
)
CHART_POSTS = (
    "Our {metric} this year. So proud of the team!",
    "Here is the {metric} chart from today's meeting.",
    "Quick update on our {metric}. See the chart.",
    "The numbers are in! Our {metric} chart for the month.",
    "Can you guess which team had the most {metric}? Chart below.",
)
SIGN_POSTS = (
    "{phrase} Look at the sign outside the shop.",
    "Put up a new sign today. {phrase}",
    "{phrase} The sign says it all.",
    "Saw this sign on my walk. {phrase}",
)

# ---------------------------------------------------------------- alt-text templates
# Correct, focused, concise. The key-fact phrases ({p}, "{n} bars", "tallest bar is {c}",
# "{c} {s} sign") appear verbatim in every template, so key facts can be matched as substrings.
GROUP_TEMPLATES = ("{p} {loc}.", "A drawing of {p} {loc}.", "{p} drawn {loc}.")
CHART_TEMPLATES = (
    "A bar chart of {metric} with {n} bars; the tallest bar is {c}.",
    "Bar chart of {metric} with {n} bars, where the tallest bar is {c}.",
    "Chart of {metric}: {n} bars, and the tallest bar is {c}.",
)
SIGN_TEMPLATES = (
    "A {c} {s} sign that says {w}.",
    "A {c} {s} sign reading {w}.",
    "Photo of a {c} {s} sign with the word {w}.",
)
GENERIC_TEXTS = (
    "An image.", "A picture.", "A photo.", "A drawing.", "Image.", "A simple drawing.",
    "Picture for the post.", "A screenshot.",
)
GENERIC_SHAPES_TEXTS = ("A picture of shapes.", "Some shapes.", "Colourful shapes.")

# Noise mix of the SFT targets (user-written alt-text): 56% correct and focused, the rest spread over
# the four bad kinds. (At 38% correct, with 18% wrong in one detail and 16% about the other thing,
# the demo's SFT model stated the key facts in 14% of test responses although the tower's features
# carry them; see README, "What `make demo` shows".)
SFT_MIX = (("correct", 0.56), ("generic", 0.12), ("wrong_detail", 0.10), ("context_blind", 0.10), ("verbose", 0.12))
REJECTED_KINDS = ("generic", "wrong_detail", "context_blind", "verbose")
TARGET_KINDS = ("correct",) + REJECTED_KINDS


# ---------------------------------------------------------------- scene objects
@dataclass(frozen=True)
class Group:
    """``count`` shapes of one colour and kind inside ``box`` (coordinates on a 112-unit canvas)."""

    colour: str
    shape: str
    count: int
    box: tuple[float, float, float, float]
    items: tuple[tuple[float, float, float], ...] = ()  # (centre x, centre y, size) per shape

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}"


@dataclass(frozen=True)
class Chart:
    """A bar chart: ``colours[i]`` bar has relative height ``heights[i]``; one bar is clearly tallest."""

    colours: tuple[str, ...]
    heights: tuple[float, ...]
    metric: str
    box: tuple[float, float, float, float]

    @property
    def n(self) -> int:
        return len(self.colours)

    @property
    def tallest(self) -> str:
        return self.colours[max(range(self.n), key=lambda i: self.heights[i])]


@dataclass(frozen=True)
class Sign:
    colour: str
    shape: str  # round | square
    word: str
    box: tuple[float, float, float, float]
    centre: tuple[float, float] = (0.0, 0.0)
    size: float = 40.0


@dataclass(frozen=True)
class Scene:
    kind: str
    background: str
    objects: dict = field(default_factory=dict)  # focus name -> Group | Chart | Sign
    chart_side: str = ""  # chart_sign only: where the chart is

    def other(self, focus: str) -> str:
        a, b = FOCI[self.kind]
        return b if focus == a else a


def _place_group(rng: random.Random, colour: str, shape: str, count: int, box) -> Group:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if w >= h:  # wide region: one row
        cols, rows = count, 1
    else:  # tall region: a column, 2x2 for four
        cols, rows = (2, 2) if count == 4 else (1, count)
    cw, ch = w / cols, h / rows
    # One size whatever the count, so the coloured area grows with the count (an easy cue).
    size = SHAPE_SIZE * rng.uniform(0.92, 1.0)
    items = []
    for i in range(count):
        c, r = i % cols, i // cols
        jx = (cw - size) / 2 * rng.uniform(-0.5, 0.5)
        jy = (ch - size) / 2 * rng.uniform(-0.5, 0.5)
        items.append((round(x0 + (c + 0.5) * cw + jx, 2), round(y0 + (r + 0.5) * ch + jy, 2), round(size, 2)))
    return Group(colour, shape, count, box, tuple(items))


def _random_group(rng: random.Random, box, avoid: Group | None = None) -> Group:
    colours = [c for c in COLOUR_NAMES if avoid is None or c != avoid.colour]
    colour = rng.choice(colours)
    while True:
        shape, count = rng.choice(SHAPES), rng.choice(GROUP_COUNTS)
        if avoid is None or (shape, count) != (avoid.shape, avoid.count):
            break
    return _place_group(rng, colour, shape, count, box)


def _random_chart(rng: random.Random, box) -> Chart:
    n = rng.randint(2, 4)
    colours = tuple(rng.sample(COLOUR_NAMES, n))
    top = rng.randrange(n)
    heights = tuple(round(rng.uniform(0.85, 1.0), 3) if i == top else round(rng.uniform(0.25, 0.62), 3) for i in range(n))
    return Chart(colours, heights, rng.choice(METRICS), box)


def _random_sign(rng: random.Random, box) -> Sign:
    x0, y0, x1, y1 = box
    size = round(min(x1 - x0, y1 - y0, 48.0) * rng.uniform(0.8, 0.92), 2)
    cx = round(rng.uniform(x0 + size / 2 + 1, x1 - size / 2 - 1), 2)
    cy = round(y0 + size / 2 + rng.uniform(1, 4), 2)
    return Sign(rng.choice(COLOUR_NAMES), rng.choice(SIGN_SHAPES), rng.choice(SIGN_WORD_LIST), box, (cx, cy), size)


def sample_scene(rng: random.Random) -> Scene:
    """Draw one scene at random (everything the image shows; independent of the post)."""
    kind = rng.choice(SCENE_KINDS)
    background = rng.choice(BACKGROUNDS)[0]
    if kind == "shapes_lr":
        left = _random_group(rng, (4, 6, 54, 106))
        right = _random_group(rng, (58, 6, 108, 106), avoid=left)
        return Scene(kind, background, {"left": left, "right": right})
    if kind == "chart_sign":
        side = rng.choice(("left", "right"))
        chart_box, sign_box = ((4, 6, 62, 106), (64, 6, 108, 106)) if side == "left" else ((50, 6, 108, 106), (4, 6, 48, 106))
        return Scene(kind, background, {"chart": _random_chart(rng, chart_box), "sign": _random_sign(rng, sign_box)}, side)
    sign = _random_sign(rng, (6, 2, 106, 56))
    bottom = _random_group(rng, (4, 62, 108, 108))
    return Scene(kind, background, {"sign": sign, "bottom": bottom})


# ---------------------------------------------------------------- drawing
def _font():
    loader = getattr(ImageFont, "load_default_imagefont", None)  # the bitmap font (Pillow >= 10.1)
    return loader() if loader is not None else ImageFont.load_default()


def draw_scene(scene: Scene, image_size: int = 112) -> Image.Image:
    """Render ``scene`` as a flat-coloured square RGB image (no antialiasing, no noise)."""
    k = image_size / 112.0
    img = Image.new("RGB", (image_size, image_size), dict(BACKGROUNDS)[scene.background])
    d = ImageDraw.Draw(img)
    d.fontmode = "1"
    font = _font()

    def px(v: float) -> int:
        return int(round(v * k))

    def text(cx: float, cy: float, s: str, fill) -> None:
        l, t, r, b = d.textbbox((0, 0), s, font=font)
        d.text((px(cx) - (r - l) // 2, px(cy) - (b - t) // 2 - t), s, font=font, fill=fill)

    for name in FOCI[scene.kind]:
        obj = scene.objects[name]
        if isinstance(obj, Group):
            for cx, cy, s in obj.items:
                x0, y0, x1, y1 = px(cx - s / 2), px(cy - s / 2), px(cx + s / 2), px(cy + s / 2)
                fill = COLOURS[obj.colour]
                if obj.shape == "circle":
                    d.ellipse((x0, y0, x1, y1), fill=fill)
                elif obj.shape == "square":
                    d.rectangle((x0, y0, x1, y1), fill=fill)
                else:
                    d.polygon([(px(cx), y0), (x1, y1), (x0, y1)], fill=fill)
        elif isinstance(obj, Chart):
            x0, y0, x1, y1 = obj.box
            text((x0 + x1) / 2, y0 + 4, obj.metric.upper(), INK)
            px0, py0, px1, py1 = x0 + 4, y0 + 14, x1 - 2, y1 - 3
            d.line((px(px0), px(py1), px(px1), px(py1)), fill=INK, width=max(1, px(2)))
            d.line((px(px0), px(py0), px(px0), px(py1)), fill=INK, width=max(1, px(2)))
            slot = (px1 - px0 - 3) / obj.n
            for i, (c, h) in enumerate(zip(obj.colours, obj.heights)):
                bx0 = px0 + 3 + i * slot + slot * 0.12
                bx1 = bx0 + slot * 0.76
                d.rectangle((px(bx0), px(py1 - h * (py1 - py0 - 2)), px(bx1), px(py1) - 1), fill=COLOURS[c])
        else:  # Sign
            cx, cy = obj.centre
            s = obj.size
            d.rectangle((px(cx - 2), px(cy), px(cx + 2), px(obj.box[3])), fill=POLE)
            box = (px(cx - s / 2), px(cy - s / 2), px(cx + s / 2), px(cy + s / 2))
            if obj.shape == "round":
                d.ellipse(box, fill=COLOURS[obj.colour])
            else:
                d.rectangle(box, fill=COLOURS[obj.colour])
            text(cx, cy, obj.word, (0, 0, 0) if obj.colour == "yellow" else (255, 255, 255))
    return img


def png_bytes(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------- text
def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def describe(scene: Scene, name: str, template: int, obj=None) -> str:
    """Concise alt-text about the thing ``name`` of ``scene`` (``obj`` overrides it, for wrong details)."""
    obj = scene.objects[name] if obj is None else obj
    if isinstance(obj, Group):
        t = GROUP_TEMPLATES[template % len(GROUP_TEMPLATES)]
        return _cap(t.format(p=obj.phrase(), loc=LOCATIONS[name]))
    if isinstance(obj, Chart):
        t = CHART_TEMPLATES[template % len(CHART_TEMPLATES)]
        return _cap(t.format(metric=obj.metric, n=COUNT_WORDS[obj.n], c=obj.tallest))
    t = SIGN_TEMPLATES[template % len(SIGN_TEMPLATES)]
    return _cap(t.format(c=obj.colour, s=obj.shape, w=obj.word))


def caption(scene: Scene, rng: random.Random) -> str:
    """Both things of the scene, each in one of the alt-text templates (key-fact phrases verbatim)."""
    return " ".join(describe(scene, name, rng.randrange(3)) for name in FOCI[scene.kind])


# Instructions of the caption records; the `plain` template of stage 1 drops them, as in LLaVA.
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in this picture?", "Write a short caption for the image.")


def key_facts(scene: Scene, name: str) -> list[str]:
    obj = scene.objects[name]
    if isinstance(obj, Group):
        return [obj.phrase()]
    if isinstance(obj, Chart):
        return [f"{COUNT_WORDS[obj.n]} bars", f"tallest bar is {obj.tallest}"]
    return [f"{obj.colour} {obj.shape} sign"]


def context_terms(scene: Scene, name: str) -> list[str]:
    obj = scene.objects[name]
    if isinstance(obj, Group):
        return [name]  # left | right | bottom
    if isinstance(obj, Chart):
        return ["chart", obj.metric]
    return ["sign", obj.word.lower()]


def write_post(scene: Scene, focus: str, rng: random.Random) -> str:
    obj = scene.objects[focus]
    if isinstance(obj, Group):
        if focus == "bottom":
            return rng.choice(BOTTOM_POSTS)
        return rng.choice(SIDE_POSTS).format(side=focus)
    if isinstance(obj, Chart):
        return rng.choice(CHART_POSTS).format(metric=obj.metric)
    return rng.choice(SIGN_POSTS).format(phrase=rng.choice(SIGN_WORDS[obj.word]))


def wrong_detail(scene: Scene, name: str, rng: random.Random):
    """The object ``name`` with exactly one visual fact changed (colour, count, shape, tallest bar...)."""
    obj = scene.objects[name]
    if isinstance(obj, Group):
        what = rng.choice(("colour", "count", "shape"))
        if what == "colour":
            return replace(obj, colour=rng.choice([c for c in COLOUR_NAMES if c != obj.colour]))
        if what == "count":
            return replace(obj, count=rng.choice([n for n in GROUP_COUNTS if n != obj.count]))
        return replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    if isinstance(obj, Chart):
        if rng.random() < 0.6:  # a shorter bar named as the tallest
            new_top = rng.choice([c for c in obj.colours if c != obj.tallest])
            heights = tuple(1.0 if c == new_top else 0.5 for c in obj.colours)
            return replace(obj, heights=heights)
        n = rng.choice([m for m in (2, 3, 4) if m != obj.n])
        colours = list(obj.colours)
        heights = list(obj.heights)
        while len(colours) < n:  # add a short bar in an unused colour
            colours.append(next(c for c in COLOUR_NAMES if c not in colours))
            heights.append(0.1)
        while len(colours) > n:  # drop a bar that is not the tallest
            i = next(i for i in range(len(colours)) if colours[i] != obj.tallest)
            del colours[i], heights[i]
        return replace(obj, colours=tuple(colours), heights=tuple(heights))
    if rng.random() < 0.5:
        return replace(obj, colour=rng.choice([c for c in COLOUR_NAMES if c != obj.colour]))
    return replace(obj, shape="square" if obj.shape == "round" else "round")


def _clause(scene: Scene, name: str) -> str:
    obj = scene.objects[name]
    if isinstance(obj, Group):
        return ("there is " if obj.count == 1 else "there are ") + obj.phrase()
    if isinstance(obj, Chart):
        cs = list(obj.colours)
        listed = ", ".join(cs[:-1]) + " and " + cs[-1]
        return (f"there is a bar chart of {obj.metric} with {COUNT_WORDS[obj.n]} bars coloured {listed}, "
                f"and the tallest bar is {obj.tallest}")
    return f"there is a {obj.colour} {obj.shape} sign on a gray pole with the word {obj.word} on it"


def verbose(scene: Scene, rng: random.Random) -> str:
    """Caption-style: everything in the picture, at length, with no regard for the post."""
    if scene.kind == "shapes_lr":
        parts = [("on the left", "left"), ("on the right", "right")]
        mid = "The picture shows two groups of flat shapes side by side"
    elif scene.kind == "chart_sign":
        cs = scene.chart_side
        ss = "right" if cs == "left" else "left"
        parts = [(f"on the {cs}", "chart"), (f"on the {ss}", "sign")]
        mid = "The picture is split into two halves"
    else:
        parts = [("at the top", "sign"), ("at the bottom", "bottom")]
        mid = "The picture has two parts, one above the other"
    if rng.random() < 0.5:
        parts.reverse()
    (w1, n1), (w2, n2) = parts
    body = f"{_cap(w1)} {_clause(scene, n1)}, and {w2} {_clause(scene, n2)}."
    if rng.random() < 0.5:
        return f"This image has a {scene.background} background. {mid}. {body} Everything is drawn in simple flat colours."
    return f"{mid}. {body} The background is {scene.background} and there is nothing else in the image."


def generic(scene: Scene, focus: str, rng: random.Random) -> str:
    pool = GENERIC_TEXTS + (GENERIC_SHAPES_TEXTS if isinstance(scene.objects[focus], Group) else ())
    return rng.choice(pool)


@dataclass
class Example:
    """One drawn image with its post and every kind of alt-text for it."""

    seed: int
    scene: Scene
    focus: str
    post: str
    texts: dict  # target kind -> alt-text (correct, generic, wrong_detail, context_blind, verbose)
    key_facts: list
    context_terms: list
    image_size: int = 112

    @property
    def question(self) -> str:
        return QUESTION_PREFIX + self.post

    @property
    def correct(self) -> str:
        return self.texts["correct"]

    def image(self) -> Image.Image:
        return draw_scene(self.scene, self.image_size)


def make_example(seed: int, image_size: int = 112, focus: str | None = None) -> Example:
    """One record from its own seed. The image depends on ``seed`` only; ``focus`` (which of the
    image's two things the post is about) is drawn from the seed unless forced."""
    scene = sample_scene(random.Random(f"scene:{seed}"))
    rng = random.Random(f"text:{seed}")
    drawn_focus = rng.choice(FOCI[scene.kind])
    focus = drawn_focus if focus is None else focus
    if focus not in FOCI[scene.kind]:
        raise ValueError(f"focus {focus!r} is not one of {FOCI[scene.kind]} for a {scene.kind} scene")
    other = scene.other(focus)
    template = rng.randrange(3)
    texts = {
        "correct": describe(scene, focus, template),
        "generic": generic(scene, focus, rng),
        "wrong_detail": describe(scene, focus, template, obj=wrong_detail(scene, focus, rng)),
        "context_blind": describe(scene, other, rng.randrange(3)),
        "verbose": verbose(scene, rng),
    }
    post = write_post(scene, focus, rng)
    return Example(seed, scene, focus, post, texts, key_facts(scene, focus), context_terms(scene, focus), image_size)


# ---------------------------------------------------------------- splits and files
def allocate(n: int, mix, rng: random.Random) -> list[str]:
    """Exactly ``round(n * share)`` of each kind (largest remainders), shuffled."""
    raw = [(k, n * p) for k, p in mix]
    counts = {k: int(v) for k, v in raw}
    left = n - sum(counts.values())
    for k, _ in sorted(raw, key=lambda kv: -(kv[1] - int(kv[1])))[:left]:
        counts[k] += 1
    kinds = [k for k, _ in mix for _ in range(counts[k])]
    rng.shuffle(kinds)
    return kinds


def build_split(split: str, n: int, seed: int, image_size: int = 112) -> tuple[list[Example], list[str]]:
    """The examples of one split and, per example, the kind of its target (sft) or rejected (pref)."""
    rng = random.Random(f"sample-alt-text:{seed}:{split}")
    examples = [make_example(rng.getrandbits(63), image_size) for _ in range(n)]
    if split == "sft":
        kinds = allocate(n, SFT_MIX, rng)
    elif split == "pref":
        kinds = allocate(n, [(k, 1 / len(REJECTED_KINDS)) for k in REJECTED_KINDS], rng)
    elif split == "pretrain":
        kinds = ["caption"] * n
    else:
        kinds = ["correct"] * n
    return examples, kinds


def sft_record(i: int, ex: Example, kind: str) -> dict:
    return {
        "id": f"sft_{i:05d}",
        "image": f"sft/sft_{i:05d}.png",
        "conversations": [
            {"from": "human", "value": "<image>\n" + ex.question},
            {"from": "gpt", "value": ex.texts[kind]},
        ],
    }


def pretrain_record(i: int, ex: Example) -> dict:
    rng = random.Random(f"caption:{ex.seed}")
    return {
        "id": f"pretrain_{i:05d}",
        "image": f"pretrain/pretrain_{i:05d}.png",
        "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(CAPTION_PROMPTS)},
            {"from": "gpt", "value": caption(ex.scene, rng)},
        ],
    }


def pref_record(i: int, ex: Example, kind: str) -> dict:
    path = f"pref/pref_{i:05d}.png"
    text = json.dumps({"question": ex.question, "chosen": ex.correct, "rejected": ex.texts[kind]}, ensure_ascii=False)
    return {
        "ds_name": DS_NAME, "image": {"path": path}, "image_path": path, "idx": i,
        "origin_dataset": ORIGIN_DATASET, "origin_split": "{}", "text": text, "rejected_kind": kind,
    }


def test_record(i: int, ex: Example) -> dict:
    return {
        "image_path": f"test/test_{i:05d}.png", "question": ex.question, "chosen": ex.correct, "idx": i,
        "key_facts": ex.key_facts, "context_terms": ex.context_terms,
    }


def _dump_array(records: list[dict]) -> str:
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


def generate(out: str | Path, seed: int = 0, n_sft: int = 1500, n_pref: int = 500, n_test: int = 200,
             image_size: int = 112, n_pretrain: int = 2000) -> dict:
    """Write the corpus to ``out``; return a summary (counts per kind)."""
    out = Path(out)
    summary: dict = {"seed": seed, "image_size": image_size, "files": {}}
    splits = (("pretrain", n_pretrain, "pretrain"), ("sft", n_sft, "sft"), ("pref", n_pref, "pref"), ("test", n_test, "test"))
    for split, n, prefix in splits:
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in sorted(folder.glob(f"{prefix}_*.png")):  # left over from a larger run
            stale.unlink()
        examples, kinds = build_split(split, n, seed, image_size)
        for i, ex in enumerate(examples):
            (folder / f"{prefix}_{i:05d}.png").write_bytes(png_bytes(ex.image()))
        if split == "pretrain":
            (out / "pretrain.json").write_text(_dump_array([pretrain_record(i, e) for i, e in enumerate(examples)]), encoding="utf-8")
            summary["files"]["pretrain.json"] = n
        elif split == "sft":
            (out / "sft.json").write_text(_dump_array([sft_record(i, e, k) for i, (e, k) in enumerate(zip(examples, kinds))]), encoding="utf-8")
            summary["files"]["sft.json"] = n
        elif split == "pref":
            (out / "preference.json").write_text(_dump_array([pref_record(i, e, k) for i, (e, k) in enumerate(zip(examples, kinds))]), encoding="utf-8")
            summary["files"]["preference.json"] = n
        else:
            lines = "".join(json.dumps(test_record(i, e), ensure_ascii=False) + "\n" for i, e in enumerate(examples))
            (out / "test.jsonl").write_text(lines, encoding="utf-8")
            summary["files"]["test.jsonl"] = n
        summary[split] = {
            "kinds": {k: kinds.count(k) for k in (*TARGET_KINDS, "caption") if kinds.count(k)},
            "scenes": {s: sum(e.scene.kind == s for e in examples) for s in SCENE_KINDS},
        }
    return summary


def draw_figure(out: str | Path, path: str | Path, seed: int, n_pref: int) -> Path:
    """A figure of four preference records of ``out`` (one per rejected kind, varied scenes)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, path = Path(out), Path(path)
    records = json.loads((out / "preference.json").read_text(encoding="utf-8"))
    examples, kinds = build_split("pref", n_pref, seed)
    picked, scenes = [], []
    for want in REJECTED_KINDS:
        cands = [i for i, k in enumerate(kinds) if k == want]
        fresh = [i for i in cands if examples[i].scene.kind not in scenes]
        i = (fresh or cands)[0]
        picked.append(i)
        scenes.append(examples[i].scene.kind)
    fig, axes = plt.subplots(len(picked), 2, figsize=(10, 2.5 * len(picked)), gridspec_kw={"width_ratios": [1, 3.6]})
    for row, i in enumerate(picked):
        rec, ex = records[i], examples[i]
        text = json.loads(rec["text"])
        with Image.open(out / rec["image_path"]) as im:
            axes[row, 0].imshow(im.convert("RGB"), interpolation="nearest")
        axes[row, 0].set_axis_off()
        axes[row, 0].set_title(rec["image_path"], fontsize=8)
        lines = [
            ("Post", ex.post, "black"),
            ("Chosen", text["chosen"], "darkgreen"),
            (f"Rejected ({rec['rejected_kind']})", text["rejected"], "firebrick"),
        ]
        ax = axes[row, 1]
        ax.set_axis_off()
        y = 0.98
        for label, body, colour in lines:
            wrapped = textwrap.fill(f"{label}: {body}", width=92)
            ax.text(0.0, y, wrapped, va="top", ha="left", fontsize=9, color=colour, transform=ax.transAxes)
            y -= 0.12 + 0.13 * (wrapped.count("\n") + 1)
    fig.suptitle(f"Sample alt-text preference records (seed {seed}): the post picks the thing, the pixels give its facts", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (also the image folder of all four files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_pretrain", type=int, default=2000, help="caption records (stage 1)")
    p.add_argument("--n_sft", type=int, default=1500, help="SFT records (noisy targets)")
    p.add_argument("--n_pref", type=int, default=500, help="preference records (format A)")
    p.add_argument("--n_test", type=int, default=200, help="test records (format T)")
    p.add_argument("--image_size", type=int, default=112, help="side of the square RGB images, in pixels")
    p.add_argument("--figure", default=None, help="also draw a figure of four preference records to this PNG")
    a = p.parse_args(argv)
    s = generate(a.out, a.seed, a.n_sft, a.n_pref, a.n_test, a.image_size, a.n_pretrain)
    out = Path(a.out)
    print(f"wrote sample alt-text corpus to {out} (seed {a.seed}, {a.image_size}px images, {_size(out) / 1e6:.2f} MB)")
    for split, name in (("pretrain", "pretrain.json"), ("sft", "sft.json"), ("pref", "preference.json"), ("test", "test.jsonl")):
        kinds = ", ".join(f"{k} {v}" for k, v in s[split]["kinds"].items())
        scenes = ", ".join(f"{k} {v}" for k, v in s[split]["scenes"].items())
        label = {"pretrain": "targets", "sft": "targets", "pref": "rejected", "test": "references"}[split]
        print(f"  {name:16s} {s['files'][name]:5d} records, images in {split}/; {label}: {kinds}; scenes: {scenes}")
    if a.figure:
        print(f"  figure: {draw_figure(out, a.figure, a.seed, a.n_pref)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
