"""The causal model never looks ahead, and left padding changes nothing for the real tokens."""

import pytest
import torch

from longvq import LongVQForCausalLM
from helpers import tiny_config


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 8])
@pytest.mark.parametrize("bias", ["simple", "rotary"])
def test_logits_ignore_future_tokens(chunk_size, bias):
    torch.manual_seed(chunk_size)
    model = LongVQForCausalLM(tiny_config(chunk_size=chunk_size, relative_positional_bias=bias)).eval()
    ids = torch.randint(0, 50, (2, 21))
    logits = model(ids).logits
    for t in [0, chunk_size - 1, chunk_size, 2 * chunk_size + 1, 13, 19]:
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 50, changed[:, t + 1 :].shape)
        other = model(changed).logits
        torch.testing.assert_close(other[:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=1e-5)
        if t + 1 < ids.shape[1]:  # the change is visible afterwards, so the comparison is not vacuous
            assert (other[:, t + 1 :] - logits[:, t + 1 :]).abs().max() > 1e-3


def test_gradient_of_early_logits_ignores_future_inputs():
    torch.manual_seed(0)
    model = LongVQForCausalLM(tiny_config(chunk_size=3)).eval()
    embeds = model.get_input_embeddings()(torch.randint(0, 50, (1, 12))).detach().requires_grad_()
    model(inputs_embeds=embeds).logits[0, 5].sum().backward()
    assert embeds.grad[0, 6:].abs().max() < 1e-5  # FFT rounding only
    assert embeds.grad[0, :6].abs().min() > 0


@pytest.mark.parametrize("chunk_size", [2, 4, 5])
def test_left_padded_row_equals_the_row_alone(chunk_size):
    torch.manual_seed(chunk_size)
    model = LongVQForCausalLM(tiny_config(chunk_size=chunk_size)).eval()
    lengths = [17, 9, 12, 1]
    rows = [torch.randint(0, 50, (n,)) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = row
        mask[i, width - len(row) :] = 1
    batched = model(ids, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        torch.testing.assert_close(batched[i, width - len(row) :], alone, atol=1e-5, rtol=1e-5)


def test_right_padding_and_pad_ids_do_not_matter():
    torch.manual_seed(3)
    model = LongVQForCausalLM(tiny_config(chunk_size=4)).eval()
    ids = torch.randint(0, 50, (2, 15))
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0
    mask[1, :2] = 0
    reference = model(ids, attention_mask=mask).logits
    noisy = ids.clone()
    noisy[mask == 0] = torch.randint(0, 50, (int((mask == 0).sum()),))
    other = model(noisy, attention_mask=mask).logits
    torch.testing.assert_close(other[mask.bool()], reference[mask.bool()], atol=1e-5, rtol=1e-5)
