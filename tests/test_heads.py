"""Heads: losses equal the transformers losses on the returned logits plus the weighted commitment loss, pooling,
logits_to_keep, tuple outputs and hidden states."""

import pytest
import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from longvq import LongVQForCausalLM, LongVQForSequenceClassification, LongVQModel

VOCAB, D, LAYERS = 50, 32, 2
WEIGHT = 0.5  # a commitment weight large enough that a missing or doubled term shows


def _padded_batch(length=11):
    """Rows: full, right-padded, left-padded."""
    ids = torch.randint(1, VOCAB, (3, length))
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, -4:] = 0
    mask[2, :5] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Sequence classification losses
# ---------------------------------------------------------------------------------------------------------------------


def _classifier(tiny_config, **overrides):
    values = dict(vq_commitment_weight=WEIGHT, bidirectional=True)
    values.update(overrides)
    return LongVQForSequenceClassification(tiny_config(**values))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_single_label_loss(tiny_config, train):
    model = _classifier(tiny_config, num_labels=3, problem_type="single_label_classification").train(train)
    ids, mask = _padded_batch()
    labels = torch.tensor([2, 0, 1])
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 3)
    assert out.commitment_loss > 0
    expected = F.cross_entropy(out.logits, labels) + WEIGHT * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)


def test_multi_label_loss(tiny_config):
    model = _classifier(tiny_config, num_labels=4, problem_type="multi_label_classification").train()
    ids, mask = _padded_batch()
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    out = model(ids, attention_mask=mask, labels=labels)
    expected = F.binary_cross_entropy_with_logits(out.logits, labels) + WEIGHT * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)


def test_regression_loss(tiny_config):
    model = _classifier(tiny_config, num_labels=1, problem_type="regression").train()
    ids, mask = _padded_batch()
    labels = torch.tensor([0.5, -1.0, 2.0])
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 1)
    expected = F.mse_loss(out.logits.squeeze(-1), labels) + WEIGHT * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)


def test_multi_output_regression_loss(tiny_config):
    model = _classifier(tiny_config, num_labels=2, problem_type="regression").train()
    ids, mask = _padded_batch()
    labels = torch.randn(3, 2)
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits, labels) + WEIGHT * out.commitment_loss)


@pytest.mark.parametrize(
    "num_labels, labels, reference",
    [
        (3, torch.tensor([2, 0, 1]), lambda logits, labels: F.cross_entropy(logits, labels)),
        (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), F.binary_cross_entropy_with_logits),
        (1, torch.tensor([0.5, -1.0, 2.0]), lambda logits, labels: F.mse_loss(logits.squeeze(-1), labels)),
    ],
    ids=["inferred_single_label", "inferred_multi_label", "inferred_regression"],
)
def test_problem_type_is_inferred_from_labels(tiny_config, num_labels, labels, reference):
    model = _classifier(tiny_config, num_labels=num_labels).eval()
    ids, mask = _padded_batch()
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, reference(out.logits, labels) + WEIGHT * out.commitment_loss)


# ---------------------------------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_mean_pooling_is_the_mean_over_real_tokens(tiny_config, bidirectional):
    model = _classifier(tiny_config, num_labels=3, classifier_pooling="mean", bidirectional=bidirectional).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.hidden_states[-1], hidden, rtol=0, atol=0)
    real = mask.unsqueeze(-1).float()
    pooled = (hidden * real).sum(1) / real.sum(1)
    for row in range(3):  # the same, written per row over the real positions only
        torch.testing.assert_close(pooled[row], hidden[row, mask[row].bool()].mean(0))
    torch.testing.assert_close(out.logits, model.score(pooled), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_last_pooling_takes_the_last_real_token(tiny_config, bidirectional):
    model = _classifier(tiny_config, num_labels=3, classifier_pooling="last", bidirectional=bidirectional).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    last = [10, 6, 10]  # full row, right-padded row (4 pads), left-padded row
    pooled = torch.stack([hidden[row, index] for row, index in enumerate(last)])
    torch.testing.assert_close(out.logits, model.score(pooled), rtol=1e-6, atol=1e-6)


def test_last_pooling_with_a_single_real_token(tiny_config):
    model = _classifier(tiny_config, num_labels=2, classifier_pooling="last").eval()
    ids = torch.randint(1, VOCAB, (2, 6))
    mask = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out.logits, model.score(torch.stack([hidden[0, 0], hidden[1, 5]])), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("bidirectional", [True, False], ids=["bidirectional", "causal"])
def test_padding_does_not_change_the_classification(tiny_config, pooling, bidirectional):
    """A padded row classifies exactly like the same tokens alone, whatever the padded positions hold."""
    model = _classifier(tiny_config, num_labels=3, classifier_pooling=pooling, bidirectional=bidirectional).eval()
    ids, mask = _padded_batch()
    garbage = torch.randint(1, VOCAB, ids.shape)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        other_pads = model(torch.where(mask.bool(), ids, garbage), attention_mask=mask).logits
        alone = torch.cat([model(ids[row, mask[row].bool()][None]).logits for row in range(3)])
    torch.testing.assert_close(other_pads, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------------------------------------------------


def _causal_lm(tiny_config, **overrides):
    return LongVQForCausalLM(tiny_config(vq_commitment_weight=WEIGHT, **overrides))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_causal_lm_loss(tiny_config, train):
    model = _causal_lm(tiny_config).train(train)
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.commitment_loss > 0
    expected = ForCausalLMLoss(out.logits, labels, vocab_size=VOCAB) + WEIGHT * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)
    # The LM term really is next-token cross-entropy (shifted by one), not an unshifted one.
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, shifted + WEIGHT * out.commitment_loss)


def test_causal_lm_loss_with_num_items_in_batch(tiny_config):
    model = _causal_lm(tiny_config).train()
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    num_items = 40
    out = model(ids, attention_mask=mask, labels=labels, num_items_in_batch=num_items)
    lm = ForCausalLMLoss(out.logits, labels, vocab_size=VOCAB, num_items_in_batch=num_items)
    expected = lm + WEIGHT * out.commitment_loss * mask.sum() / num_items
    torch.testing.assert_close(out.loss, expected)


def test_causal_lm_loss_from_inputs_embeds(tiny_config):
    model = _causal_lm(tiny_config).eval()
    ids, mask = _padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        from_ids = model(ids, attention_mask=mask, labels=labels)
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(ids), attention_mask=mask, labels=labels)
    torch.testing.assert_close(from_embeds.loss, from_ids.loss, rtol=0, atol=1e-6)


@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep(tiny_config, keep):
    model = _causal_lm(tiny_config).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        kept = model(ids, attention_mask=mask, logits_to_keep=keep).logits
        everything = model(ids, attention_mask=mask, logits_to_keep=0).logits
    assert full.shape == (3, 11, VOCAB)
    assert kept.shape == (3, keep, VOCAB)
    torch.testing.assert_close(kept, full[:, -keep:], rtol=0, atol=1e-6)
    torch.testing.assert_close(everything, full, rtol=0, atol=0)


def test_logits_to_keep_with_index_tensor(tiny_config):
    model = _causal_lm(tiny_config).eval()
    ids, mask = _padded_batch()
    index = torch.tensor([0, 4, 10])
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        kept = model(ids, attention_mask=mask, logits_to_keep=index).logits
    torch.testing.assert_close(kept, full[:, index], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# return_dict=False and hidden states
# ---------------------------------------------------------------------------------------------------------------------


def test_causal_lm_return_dict_false(tiny_config):
    model = _causal_lm(tiny_config).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        as_dict = model(ids, attention_mask=mask, labels=ids, use_cache=False)
        as_tuple = model(ids, attention_mask=mask, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)
    assert as_tuple[0].dim() == 0


def test_classifier_return_dict_false(tiny_config):
    model = _classifier(tiny_config, num_labels=3).eval()
    ids, mask = _padded_batch()
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        as_dict = model(ids, attention_mask=mask, labels=labels)
        as_tuple = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], as_dict.logits, rtol=0, atol=0)


def test_base_model_return_dict_false(tiny_config):
    model = LongVQModel(tiny_config()).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        as_tuple = model(ids, attention_mask=mask, use_cache=False, return_dict=False)
        as_dict = model(ids, attention_mask=mask, use_cache=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], as_dict.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("model_class", [LongVQModel, LongVQForCausalLM, LongVQForSequenceClassification])
def test_output_hidden_states(tiny_config, model_class):
    model = model_class(tiny_config(num_labels=2)).eval()
    ids, mask = _padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        without = model(ids, attention_mask=mask)
        last = model.model(ids, attention_mask=mask) if model_class is not LongVQModel else without
    assert without.hidden_states is None
    hidden_states = out.hidden_states
    assert isinstance(hidden_states, tuple) and len(hidden_states) == LAYERS + 1
    for tensor in hidden_states:
        assert tensor.shape == (3, 11, D)
        assert torch.isfinite(tensor).all()
    # First: the embeddings, in the input's own positions (padding rotation undone); last: the final hidden state.
    torch.testing.assert_close(hidden_states[0], model.get_input_embeddings()(ids), rtol=0, atol=0)
    torch.testing.assert_close(hidden_states[-1], last.last_hidden_state, rtol=0, atol=0)
    assert not torch.allclose(hidden_states[1], hidden_states[0])


def test_output_hidden_states_from_config(tiny_config):
    model = LongVQForCausalLM(tiny_config(output_hidden_states=True)).eval()
    with torch.no_grad():
        out = model(torch.randint(1, VOCAB, (2, 7)))
    assert len(out.hidden_states) == LAYERS + 1
