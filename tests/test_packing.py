"""The efficient preference step equals the naive (published) one: values and gradients.

Naive = one full sequence per condition through the model's own forward, full-vocabulary
log-softmax at every position. Efficient = each record's conditions tree-packed into one row per
image, images encoded once, the head run on scored positions only, with either attention kernel
for the packed rows: ``sdpa_tree`` (one SDPA call per chain, masked-out pairs skipped; what
``auto`` chooses) or the dense masked ``sdpa`` (the reference). The naive side always runs plain
sdpa over padded rows.
"""

import pytest
import torch

from llava.constants import DEFAULT_IMAGE_TOKEN
from llava.method import CONDITION_NAMES as CONDITIONS
from llava.method import DPO_CONDITIONS, TERM_NAMES as TERMS
from llava.conversation import get_template
from llava.data.collate import PreferenceCollator
from llava.data.datasets import PreferenceDataset
from llava.data.images import ImageProcessor
from llava.data.records import read_records
from llava.model.attention import use_attention
from llava.model.forward import LOGP_CHUNK, response_logps, response_logps_naive
from llava.model.load import load_model
from llava.model.tree_attention import TREE_SDPA
from llava.train.losses import mcm_dpo_loss
from llava.train.params import Trainable, apply_lora

CASES = [("llava", "pad"), ("llava_next", "pad"), ("llava_next", "anyres")]
KERNELS = [TREE_SDPA, "sdpa"]  # the packed rows' attention: chains (the default), the dense mask (the reference)


def setup(model_dir, preference_file, aspect, conditions, batch, kernel=TREE_SDPA):
    model, processor = load_model(model_dir, attn_implementation="sdpa")
    use_attention(model, kernel)
    records = read_records(preference_file, "preference")
    tok = processor.tokenizer
    ds = PreferenceDataset(records, tok, get_template("v1"), ImageProcessor(processor, aspect), preference_file.parent,
                           2048, conditions, seed=3)
    examples = [ds[i] for i in range(batch)]
    image_id = tok.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    packed = PreferenceCollator(conditions, tok.pad_token_id, image_id, packed=True)(examples)
    naive = PreferenceCollator(conditions, tok.pad_token_id, image_id, packed=False)(examples)
    return model, packed, naive


def model_dir(arch, tiny_llava_dir, tiny_next_dir):
    return tiny_llava_dir if arch == "llava" else tiny_next_dir


def loss_of(logps, conditions, reference):
    by_name = {c: logps[:, j] for j, c in enumerate(conditions)}
    if conditions == DPO_CONDITIONS:
        weights = {t: 0.0 for t in TERMS} | {"response": 1.0}
    else:
        weights = {t: 1.0 for t in TERMS}
    return mcm_dpo_loss(by_name, reference, weights=weights, norm=7.0, beta=0.5)[0].sum()


def grads(model, batch, conditions, reference, naive):
    model.zero_grad(set_to_none=True)
    logps = response_logps_naive(model, batch) if naive else response_logps(model, batch)
    loss_of(logps, conditions, reference).backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(packed_out, naive_out, rel_logps=1e-5, rel_grad=1e-4):
    (lp, gp), (ln, gn) = packed_out, naive_out
    assert lp.shape == ln.shape
    assert ((lp - ln).abs() / ln.abs()).max().item() < rel_logps
    assert set(gp) == set(gn) and gp
    total = torch.cat([g.flatten() for g in gn.values()])
    diff = torch.cat([(gp[n] - gn[n]).flatten() for n in gn])
    assert (diff.norm() / total.norm()).item() < rel_grad
    # Per parameter too, except those whose true gradient is zero up to rounding (an attention
    # key bias shifts every score of a query alike, so its gradient is 0 in exact arithmetic).
    floor = 1e-4 * max(g.norm() for g in gn.values())
    for name in gn:
        if gn[name].norm() > floor:
            err = (gp[name] - gn[name]).norm() / gn[name].norm()
            assert err.item() < rel_grad, f"{name}: relative gradient error {err.item():.2e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("arch,aspect", CASES)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("conditions", [CONDITIONS, DPO_CONDITIONS], ids=["mcm", "dpo"])
def test_packed_equals_naive(arch, aspect, batch, conditions, kernel, tiny_llava_dir, tiny_next_dir, preference_file):
    model, packed, naive = setup(model_dir(arch, tiny_llava_dir, tiny_next_dir), preference_file, aspect, conditions, batch,
                                 kernel)
    model.train()  # both paths identical in train mode (no dropout in LLaVA), gradients on
    g = torch.Generator().manual_seed(0)
    reference = {c: -40 * torch.rand(batch, generator=g) for c in conditions}
    assert_same(grads(model, packed, conditions, reference, naive=False), grads(model, naive, conditions, reference, naive=True))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("variant", ["checkpointing", "lora"])
def test_packed_equals_naive_with_checkpointing_and_lora(variant, kernel, tiny_next_dir, preference_file):
    model, packed, naive = setup(tiny_next_dir, preference_file, "pad", CONDITIONS, 3, kernel)
    if variant == "checkpointing":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = apply_lora(model, Trainable(vision=True), r=8, alpha=16, dropout=0.0)
        for n, p in model.named_parameters():  # non-zero B so the adapters matter
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    model.train()
    reference = {c: torch.full((3,), -30.0) for c in CONDITIONS}
    assert_same(grads(model, packed, CONDITIONS, reference, naive=False), grads(model, naive, CONDITIONS, reference, naive=True))


@pytest.mark.parametrize("arch,aspect", CASES)
def test_two_images_per_record_and_no_full_vocabulary_logits(arch, aspect, tiny_llava_dir, tiny_next_dir, preference_file):
    model, packed, naive = setup(model_dir(arch, tiny_llava_dir, tiny_next_dir), preference_file, aspect, CONDITIONS, 3)
    vision_rows, head_inputs = [], []
    tower = model.model.vision_tower
    per_image = packed["pixel_values"].shape[1] if aspect == "anyres" else 1
    h1 = tower.register_forward_pre_hook(lambda m, args: vision_rows.append(args[0].shape[0]))
    h2 = model.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append((tuple(args[0].shape), tuple(out.shape))))
    with torch.no_grad():
        response_logps(model, packed)
    h1.remove(), h2.remove()
    # one vision call per step, over two images per record (anyres: their crops)
    assert len(vision_rows) == 1
    assert packed["pixel_values"].shape[0] == 2 * 3
    if aspect != "anyres":
        assert vision_rows[0] == 2 * 3 * per_image
    # the head only ever sees [scored tokens, hidden] chunks: never a sequence dimension
    scored = int(packed["logp_mask"].sum())
    assert all(len(i) == 2 and i[0] <= LOGP_CHUNK for i, _ in head_inputs)
    assert sum(i[0] for i, _ in head_inputs) == scored
    assert scored < packed["input_ids"].numel() / 4
    # the naive path, for contrast, encodes eight images per record: four times the packed path's vision rows
    packed_rows, vision_rows[:] = sum(vision_rows), []
    h1 = tower.register_forward_pre_hook(lambda m, args: vision_rows.append(args[0].shape[0]))
    with torch.no_grad():
        response_logps_naive(model, naive)
    h1.remove()
    assert naive["pixel_values"].shape[0] == 8 * 3
    assert sum(vision_rows) == 4 * packed_rows


def test_tree_positions_and_mask(tiny_llava_dir, preference_file):
    """Each branch sees its own ancestors only, at the positions of its own full sequence."""
    _, packed, naive = setup(tiny_llava_dir, preference_file, "pad", CONDITIONS, 1)
    assert packed["input_ids"].shape[0] == 2  # one row per distinct image
    width, packed_width = naive["input_ids"].shape[1], packed["input_ids"].shape[1]
    for c in range(len(CONDITIONS)):
        # rebuild condition c's sequence from the tokens its last scored position may attend to
        sel = packed["logp_mask"][0, c]
        row, last_pos = divmod(int(packed["logp_index"][0, c][sel][-1]), packed_width)
        assert row == (0 if "_mw_" in CONDITIONS[c] else 1)
        mask, pos, ids = packed["tree"].dense()[row, 0], packed["position_ids"][row], packed["input_ids"][row]
        visible = mask[last_pos].nonzero().flatten()
        full_sequence = naive["input_ids"][c][naive["attention_mask"][c]]
        n_idx = naive["logp_index"][0, c][naive["logp_mask"][0, c]] - c * width
        assert torch.equal(ids[visible], full_sequence[: int(n_idx[-1]) + 1])
        assert torch.equal(pos[visible], torch.arange(len(visible)))


def relative_errors(out, truth):
    """(max relative log-prob error, relative gradient-norm error) of ``out`` against ``truth``."""
    (lp, g), (lt, gt) = out, truth
    total = torch.cat([x.flatten() for x in gt.values()])
    diff = torch.cat([(g[n].float() - gt[n]).flatten() for n in gt])
    return ((lp - lt).abs() / lt.abs()).max().item(), (diff.norm() / total.norm()).item()


@pytest.mark.parametrize("kernel", KERNELS)
def test_packed_equals_naive_in_bf16(kernel, tiny_llava_dir, preference_file):
    """In bf16 neither path is exact, so both are held against the fp32 naive step.

    bf16 keeps 8 bits of mantissa (a rounding error of up to 2^-9 = 0.2 % per operation); the
    packed and naive paths round in different places (other shapes, other kernels, the head in
    chunks), so they cannot agree to fp32's 1e-5. The bar: the packed step's log-probs and gradient
    are no further from the fp32 step's than twice the published (naive) bf16 step's own error
    (measured: 1e-4 relative for the log-probs, summed in float32, and about 1 % for the gradient),
    and its log-probs stay within 1e-3 of the naive bf16 step's (measured: 1e-5 and below).
    """
    reference = {c: torch.full((3,), -30.0) for c in CONDITIONS}

    def step(dtype, naive, kernel="sdpa"):
        model, packed, naive_batch = setup(tiny_llava_dir, preference_file, "pad", CONDITIONS, 3, kernel)
        model.to(dtype).train()
        return grads(model, naive_batch if naive else packed, CONDITIONS, reference, naive)

    truth, naive_bf16, packed_bf16 = step(torch.float32, True), step(torch.bfloat16, True), step(torch.bfloat16, False, kernel)
    assert packed_bf16[0].dtype == torch.float32  # log-softmax in float32 even for a bf16 model
    assert all(g.dtype == torch.bfloat16 for g in packed_bf16[1].values())
    assert ((packed_bf16[0] - naive_bf16[0]).abs() / naive_bf16[0].abs()).max().item() < 1e-3
    naive_logp_err, naive_err = relative_errors(naive_bf16, truth)
    logp_err, packed_err = relative_errors(packed_bf16, truth)
    assert 0 < logp_err <= 2 * naive_logp_err and logp_err < 1e-3, (logp_err, naive_logp_err)
    assert 0 < packed_err <= 2 * naive_err and packed_err < 3e-2, (packed_err, naive_err)
