"""Cut and malformed model output through the real document assembly: every one gives a valid answer.

Valid grounded pages, as the model writes them, are cut at every character and mutated at random (a fixed
seed, a bounded count): tags dropped, duplicated, swapped or inserted, numbers made absurd, junk and the
tokenizer's non-content tokens inserted. `assemble()` runs on each with real page images, and the answer
must hold what the README promises of any answer.
"""

import math
import random
import re

from PIL import Image, ImageDraw

from checkpoints.grounding import REFERENCE_TAGS, non_content_tokens, remove_tokens
from ocr_service.document import PAGE_SEPARATOR, PageOutput, assemble
from scripts.make_random_checkpoint import added_tokens

SEED = 18
MUTATED_CASES = 1500
GROUNDING_TAGS = (*REFERENCE_TAGS, "<|grounding|>")
ADDED_TOKENS = [content for _, content, _ in added_tokens()]  # the official tokenizer's added vocabulary
NON_CONTENT = sorted(non_content_tokens(ADDED_TOKENS))
NOT_TEXT = frozenset(GROUNDING_TAGS) | frozenset(NON_CONTENT)
LINK = re.compile(r"!\[\]\((images/(\d+)\.jpg)\)")
NUMBER = re.compile(r"\d+(?:\.\d+)?")

VALID_PAGES = [
    "<|ref|>title<|/ref|><|det|>[[80, 40, 520, 90]]<|/det|>\n# Invoice\n\n"
    "<|ref|>text<|/ref|><|det|>[[80, 110, 600, 150]]<|/det|>\nInvoice no. 2024-117\n\n"
    "<|ref|>table<|/ref|><|det|>[[80, 180, 920, 330]]<|/det|>\n"
    "<table><tr><td>Item</td><td>Price</td></tr><tr><td>Toner</td><td>39.90</td></tr></table>\n\n"
    "<|ref|>image<|/ref|><|det|>[[80, 360, 480, 620]]<|/det|>\n\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[80, 630, 480, 660]]<|/det|>\n<center>Figure 1: toner</center>",
    "Scanned copy\n\n<|ref|>image<|/ref|><|det|>[[0, 0, 499, 499], [500, 500, 999, 999], [3, 3, 4, 4]]<|/det|>\n"
    "<|ref|>text<|/ref|><|det|>[[10, 700, 990, 800]]<|/det|>\nBody $x \\coloneqq 2$\n",
    "<|ref|>the red car<|/ref|><|det|>[[120, 240, 380, 610]]<|/det|>",
]
ABSURD_NUMBERS = ["1e999", "-1e999", "9" * 400, "9" * 5000, "nan", "inf", "-7", "123456789", "1e308", "0.0001",
                  "999999999999999999999", "1_000", "0x1f", "1j", "True", "-0"]
JUNK = ["[[", "]]", "[", "]", ", ", "\n", "\n\n", " ", "999", "<|", "|>", "<", ">", "# ", "<td>", "</tr>",
        "ref", "det", "((1, 2, 3, 4))", "[[1, 2, 3, 4]]", "[1, 2, 3]", "'x'", "é", "😀", "\\"]


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        tags = list(re.finditer("|".join(map(re.escape, GROUNDING_TAGS)), text))
        numbers = list(NUMBER.finditer(text))
        action = rng.randrange(8)
        if action == 0 and tags:  # drop a tag
            tag = rng.choice(tags)
            text = text[:tag.start()] + text[tag.end():]
        elif action == 1 and tags:  # duplicate a tag
            tag = rng.choice(tags)
            text = text[:tag.end()] + tag.group() + text[tag.end():]
        elif action == 2 and len(tags) > 1:  # swap two tags
            first, second = sorted(rng.sample(tags, 2), key=lambda m: m.start())
            text = (text[:first.start()] + second.group() + text[first.end():second.start()] + first.group()
                    + text[second.end():])
        elif action == 3 and numbers:  # an absurd number
            number = rng.choice(numbers)
            text = text[:number.start()] + rng.choice(ABSURD_NUMBERS) + text[number.end():]
        elif action == 4 and numbers:  # reversed corners, or a number moved out of range
            number = rng.choice(numbers)
            mirrored = 999 - int(number.group().partition(".")[0][-3:])
            text = text[:number.start()] + str(mirrored + rng.choice([0, 1000])) + text[number.end():]
        elif action == 5:  # junk, a grounding tag or a non-content token, anywhere
            at = rng.randrange(len(text) + 1)
            piece = rng.choice([rng.choice(JUNK), rng.choice(GROUNDING_TAGS), rng.choice(NON_CONTENT)])
            text = text[:at] + piece + text[at:]
        elif action == 6 and text:  # a span removed
            start = rng.randrange(len(text))
            text = text[:start] + text[start + rng.randint(1, 30):]
        elif text:  # a span repeated
            start = rng.randrange(len(text))
            span = text[start:start + rng.randint(1, 60)]
            text = text[:start] + span * rng.randint(2, 4) + text[start:]
    return text


def page_images() -> list:
    """Real images of a few sizes: tiny ones make boxes that are empty in pixels common."""
    images = []
    for size in [(64, 48), (7, 5), (1, 1), (40, 90)]:
        image = Image.new("RGB", size, "white")
        ImageDraw.Draw(image).rectangle([0, 0, size[0] // 2, size[1] // 2], fill=(200, 30, 30))
        images.append(image)
    return images


def fragments(raw: str) -> bool:
    """Whether a page holds pieces of tags besides its whole tags."""
    rest = remove_tokens(raw, NOT_TEXT)
    return any(piece in rest for piece in ("<|", "|>", "<｜", "｜>"))


def check_answer(out, raws: list, images: list, markdown: bool, out_dir) -> None:
    assert out.raw_output == PAGE_SEPARATOR.join(raw.strip() for raw in raws)  # what the model wrote
    assert PAGE_SEPARATOR.join(page["text"] for page in out.pages) == out.text
    clean = [out.text, *(page["text"] for page in out.pages)] if markdown else []
    for text in clean + [block["text"] for block in out.blocks]:
        assert not [tag for tag in GROUNDING_TAGS if tag in text], text
        assert not [token for token in NON_CONTENT if token in text], text
    sizes = {page["page"]: (page["width"], page["height"]) for page in out.pages}
    for region in out.regions:
        width, height = sizes[region["page"]]
        x1, y1, x2, y2 = region["box"]
        assert all(type(v) is int for v in region["box"]), region
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height, region
        assert len(region["box_normalized"]) == 4, region
        assert all(isinstance(v, float) and math.isfinite(v) and 0 <= v <= 999 for v in region["box_normalized"])
    located = [(b["type"], b["box"], b["box_normalized"], b["page"]) for b in out.blocks if b["box"] is not None]
    assert located == [(r["label"], r["box"], r["box_normalized"], r["page"]) for r in out.regions]
    assert all(b["box_normalized"] is None for b in out.blocks if b["box"] is None)
    # Every figure link, in the markdown or a block, names a file written; files come in the links' order.
    figures = [b["figure"] for b in out.blocks if b["figure"] is not None]
    assert [f"images/{path.name}" for path in out.figures] == figures
    assert all(path.is_file() and path.parent == out_dir for path in out.figures)
    if markdown:
        assert [link for link, _ in LINK.findall(out.text)] == figures
        if any(fragments(raw) for raw in raws):
            return  # removing a tag may have joined two fragments into one, removed too: that text is gone
        for block in out.blocks:  # no content is lost: each block's text is in its page's text
            assert block["text"] in out.pages[[p["page"] for p in out.pages].index(block["page"])]["text"]
    assert len(out.pages) == len(raws) and [p["width"] for p in out.pages] == [i.width for i in images]


def run_case(raws: list, images: list, markdown: bool, out_dir) -> None:
    pages = [PageOutput(n, raw, 10, 73, False, 1.0, "max_new_tokens", 0.5) for n, raw in enumerate(raws, 1)]
    out = assemble(pages, images, markdown, out_dir, added_tokens=ADDED_TOKENS)
    check_answer(out, raws, images, markdown, out_dir)


def test_pages_cut_at_every_character_give_valid_answers(tmp_path):
    images = page_images()
    case = 0
    for valid in VALID_PAGES:
        for cut in range(len(valid) + 1):
            case += 1
            # The cut page after a whole one: figure numbers continue across pages.
            run_case([VALID_PAGES[1], valid[:cut]], [images[0], images[case % len(images)]], markdown=case % 4 != 0,
                     out_dir=tmp_path / str(case))
    assert case == sum(len(v) + 1 for v in VALID_PAGES)


def test_mutated_pages_give_valid_answers(tmp_path):
    rng = random.Random(SEED)
    images = page_images()
    for case in range(MUTATED_CASES):
        count = rng.randint(1, 2)
        raws = [mutate(rng.choice(VALID_PAGES), rng) for _ in range(count)]
        try:
            run_case(raws, rng.sample(images, count), markdown=rng.random() < 0.75, out_dir=tmp_path / str(case))
        except Exception as error:
            raise AssertionError(f"case {case}: {raws!r}") from error
