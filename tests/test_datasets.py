"""What a preference record yields for the eight conditions, the corrupted images, truncation, sampling."""

import json
import random

import pytest
import torch
from PIL import Image

from llava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from llava.method import CONDITION_NAMES as CONDITIONS
from llava.conversation import encode_conversation, get_template, image_question
from llava.data import negatives
from llava.data.datasets import PreferenceDataset, SFTDataset
from llava.data.images import ImageProcessor, expand_to_square, open_image
from llava.data.records import DataError, read_records
from llava.data.sampler import ModalityLengthGroupedSampler
from llava.model.load import load_model
from tests.conftest import write_preference_set


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return load_model(tiny_llava_dir)[1]


def dataset(processor, path, image_type="diffusion", seed=7, aspect="pad", max_length=2048, conditions=CONDITIONS, **kw):
    records = read_records(path, "preference")
    return PreferenceDataset(records, processor.tokenizer, get_template("v1"), ImageProcessor(processor, aspect),
                             path.parent, max_length, conditions, image_type=image_type, seed=seed, **kw)


def llava_sequence(tok, question, answer):
    """The whole condition as LLaVA's preprocess encodes it: ids and labels."""
    return encode_conversation(tok, get_template("v1"), [(image_question(question), answer)])


def test_a_record_yields_what_the_eight_conditions_need(processor, preference_file):
    ds = dataset(processor, preference_file)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    records = ds.records
    for i in range(len(ds)):
        e = ds[i]
        r = records[i]
        j = negatives.swapped_context_index(i, len(ds), 7)
        assert j != i
        # every (context, response) branch, put back together, is LLaVA's sequence with only the response trained
        for question, q_ids in ((r.question, e.question_w), (records[j].question, e.question_l)):
            for answer, y_ids in ((r.chosen, e.response_w), (r.rejected, e.response_l)):
                ids, labels = llava_sequence(tok, question, answer)
                assert e.prefix + [image_id] + q_ids + y_ids == ids
                assert labels == [IGNORE_INDEX] * (len(ids) - len(y_ids)) + y_ids
        assert e.response_w[-1] == e.response_l[-1] == tok.eos_token_id
        truth = ImageProcessor(processor, "pad")(open_image(r, preference_file.parent))
        assert torch.equal(e.image_w.pixel_values, truth.pixel_values)
        assert e.image_l.pixel_values.shape == truth.pixel_values.shape and not torch.equal(e.image_l.pixel_values, truth.pixel_values)
        assert e.image_w.num_tokens == e.image_l.num_tokens == 16


def test_same_index_and_seed_give_the_same_output(processor, preference_file):
    for kind in negatives.IMAGE_TYPES:
        a, b = dataset(processor, preference_file, kind)[3], dataset(processor, preference_file, kind)[3]
        assert torch.equal(a.image_l.pixel_values, b.image_l.pixel_values), kind
        assert a.question_l == b.question_l
    c = dataset(processor, preference_file, "diffusion", seed=8)[3]
    assert not torch.equal(a.image_l.pixel_values, c.image_l.pixel_values)


def test_diffusion_at_step_700_matches_method(processor, preference_file):
    assert negatives.alpha_bar(700) ** 0.5 == pytest.approx(0.5927, abs=5e-5)
    assert (1 - negatives.alpha_bar(700)) ** 0.5 == pytest.approx(0.8054, abs=5e-5)
    ds = dataset(processor, preference_file, "diffusion")
    eps = []
    for i in range(len(ds)):
        e = ds[i]
        eps.append(((e.image_l.pixel_values - 0.5927 * e.image_w.pixel_values) / 0.8054).flatten())
    eps = torch.cat(eps)  # the noise that was added: standard normal
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    assert eps.numel() > 50000


def test_schedule_is_the_sigmoid_one_written_out():
    import math

    betas = [1 / (1 + math.exp(-(-6 + 12 * t / 999))) * (5e-3 - 1e-5) + 1e-5 for t in range(1000)]
    prod = 1.0
    for t in range(1000):
        prod *= 1 - betas[t]
        if t in (0, 250, 700, 999):
            assert negatives.alpha_bar(t) == pytest.approx(prod, rel=1e-9)
    with pytest.raises(ValueError, match="diffusion_step"):
        negatives.alpha_bar(1000)


def test_black_crop_rotate_random(processor, tmp_path):
    big = tmp_path / "big"
    path = write_preference_set(big, n=4)
    for i in range(4):  # images larger than the crop window
        Image.new("RGB", (400, 500), (i * 60, 100, 200)).save(big / "images" / f"img_{i}.png")
    ip = ImageProcessor(processor, "pad")
    black = dataset(processor, path, "black")[0].image_l.pixel_values
    assert torch.count_nonzero(black) == 0
    rng = random.Random(negatives.record_seed(7, 0, "image"))
    image = open_image(read_records(path, "preference")[0], big)
    crop = negatives.random_crop(image, rng)
    assert crop.size == (240, 320)
    assert torch.equal(dataset(processor, path, "crop")[0].image_l.pixel_values, ip(crop).pixel_values)
    angle = random.Random(negatives.record_seed(7, 0, "image")).uniform(10, 80)
    assert 10 <= angle <= 80
    # torchvision's RandomRotation defaults, as released: nearest-neighbour (no new colours), black corners
    rotated = negatives.random_rotation(image, random.Random(negatives.record_seed(7, 0, "image")))
    assert rotated.size == image.size and rotated.getpixel((0, 0)) == (0, 0, 0)
    assert {c for _, c in rotated.getcolors()} == {(0, 0, 0), image.getpixel((200, 250))}
    assert torch.equal(dataset(processor, path, "rotate")[0].image_l.pixel_values, ip(rotated).pixel_values)
    # `random`: the image of the record whose question is the swapped context (one other record, as released)
    records = read_records(path, "preference")
    ds = dataset(processor, path, "random")
    other = negatives.swapped_context_index(0, 4, 7)
    assert other != 0 and ds[0].question_l == ds._question_and_responses(records[0], records[other].question, 10**6)[0]
    assert torch.equal(ds[0].image_l.pixel_values, ip(open_image(records[other], big)).pixel_values)


def test_other_index_is_uniform_over_the_others():
    counts = [0] * 5
    for i in range(2000):
        j = negatives.other_index(2, 5, i, "context")
        counts[j] += 1
    assert counts[2] == 0 and min(c for k, c in enumerate(counts) if k != 2) > 400


def test_pad_is_a_square_in_the_mean_colour(processor):
    ip = ImageProcessor(processor, "pad")
    assert ip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # CLIP's
    assert ip.fill == (122, 116, 104)  # LLaVA's tuple(int(x * 255) for x in image_mean), truncated
    square = expand_to_square(Image.new("RGB", (40, 10), (255, 0, 0)), ip.fill)
    assert square.size == (40, 40) and square.getpixel((0, 0)) == ip.fill and square.getpixel((20, 20)) == (255, 0, 0)
    pixels = ip(Image.new("RGB", (40, 10), (255, 0, 0))).pixel_values
    assert pixels[:, 0, 0].abs().max() < 0.02  # corners: the mean colour normalises to ~0


def test_long_context_is_shortened_never_the_image(processor, tmp_path):
    path = write_preference_set(tmp_path, n=3)
    records = json.loads(path.read_text())
    text = json.loads(records[0]["text"])
    text["question"] += " " + " ".join(["word"] * 400)
    records[0]["text"] = json.dumps(text)
    path.write_text(json.dumps(records))
    ds = dataset(processor, path, max_length=160)
    e = ds[0]
    for q in (e.question_w, e.question_l):
        for y in (e.response_w, e.response_l):
            assert len(e.prefix) + e.image_w.num_tokens + len(q) + len(y) <= 160
    assert e.image_w.num_tokens == 16
    assert processor.tokenizer.decode(e.question_w).startswith("\nGiven an image")
    # room for the prompt and the image (74 tokens) but not for the answers: the answer is blamed
    with pytest.raises(DataError, match="record 0, field 'question'.*answer is too long"):
        dataset(processor, path, max_length=80)[0]


def test_a_budget_that_cannot_hold_the_image_is_refused_before_any_record(tiny_next_dir, preference_file):
    """anyres tiles an image into up to 88 tokens on the tiny LLaVA-NeXT (LLaVA-1.6-7B: ~2,900): a
    --model_max_length below that and the prompt stops at once, naming the count and what is needed."""
    next_processor = load_model(tiny_next_dir)[1]
    images = ImageProcessor(next_processor, "anyres")
    grids = next_processor.image_processor.image_grid_pinpoints
    each = next_processor._get_num_multimodal_tokens(image_sizes=[tuple(g) for g in grids])["num_image_tokens"]
    assert images.most_tokens == max(each) == 88
    prompt = len(llava_sequence(next_processor.tokenizer, "", "x")[0]) - 1  # the <image> placeholder aside
    with pytest.raises(ValueError, match=rf"^--image_aspect_ratio anyres: one image can take 88 tokens, .* "
                                         rf"--model_max_length 120; set --model_max_length to at least {88 + prompt} "):
        dataset(next_processor, preference_file, aspect="anyres", max_length=120)
    assert len(dataset(next_processor, preference_file, aspect="pad", max_length=120)[0].response_w) > 0


def test_sft_dataset_from_alt_text_records(processor, preference_file):
    records = read_records(preference_file, "sft")
    ds = SFTDataset(records, processor.tokenizer, get_template("v1"), ImageProcessor(processor, "pad"), preference_file.parent, 2048)
    e = ds[2]
    kept = [t for t, l in zip(e.input_ids, e.labels) if l != -100]
    assert processor.tokenizer.decode(kept) == records[2].chosen + "</s>"
    assert e.image is not None and e.input_ids.count(processor.tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)) == 1


def test_modality_grouped_sampler():
    lengths = [10, -5, 300, 20, -40, 150, 60, -7, 90, 33, 12, 250]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    assert order == list(sampler)  # same epoch, same order (a resumed run replays it)
    sampler.set_epoch(1)
    assert list(sampler) != order
    full = 9 // 4 + 3 // 4  # 9 records with images, 3 without, megabatches of batch * world = 4
    for k in range(full):  # a full megabatch holds one modality; the partial ones come last
        mb = order[4 * k: 4 * k + 4]
        assert len({lengths[i] > 0 for i in mb}) == 1
        # dealt into 2 batches of 2 by length: longest and shortest in the first, the middle two in the second
        desc = sorted(mb, key=lambda i: abs(lengths[i]), reverse=True)
        assert mb == [desc[0], desc[3], desc[1], desc[2]]


def test_even_batches_balances_each_device_batch_as_released():
    from llava.data.sampler import even_batches

    # lengths 80..10, longest first, into 2 batches of 4 (worked by hand): 80->A, 70->B, 60->B (70 < 80),
    # 50->A (80 < 130), 40->A (tie: the first), 30->B (130 < 170), 20->B, which is then full, 10->A
    lengths = [80, 70, 60, 50, 40, 30, 20, 10]
    assert even_batches(list(range(8)), lengths, 2) == [0, 3, 4, 7, 1, 2, 5, 6]
    assert sum(lengths[i] for i in [0, 3, 4, 7]) == sum(lengths[i] for i in [1, 2, 5, 6]) == 180
    assert even_batches([0, 1, 2, 3, 4], lengths, 2) == [0, 2, 4, 1, 3]  # 5 into 2: every other one
    assert even_batches([4, 2, 0], lengths, 1) == [4, 2, 0]  # one batch: the order stays
