"""`sequence_logps` against a plain per-position loop: masks, label shift, chunking, dtypes, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_plugins.modules.losses import sequence_logps

VOCAB = 13
PAD = 0


def loop_reference(logits, input_ids, counted):
    """Sum over (b, t) with counted[b, t] of log_softmax(logits[b, t - 1])[input_ids[b, t]], one position at a time."""
    batch, length, _ = logits.shape
    sums, counts = [], []
    for b in range(batch):
        total, count = 0.0, 0
        for t in range(1, length):
            if counted[b][t]:
                row = [float(x) for x in logits[b, t - 1].double()]
                top = max(row)
                lse = top + math.log(sum(math.exp(x - top) for x in row))
                total += row[int(input_ids[b, t])] - lse
                count += 1
        sums.append(total)
        counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts)


def preference_batch(seed=0):
    """Right-padded rows of prompt + completion with TRL's completion_mask layout (prompt 0, completion 1, pad 0)."""
    generator = torch.Generator().manual_seed(seed)
    layout = [(3, 4), (5, 1), (2, 6), (4, 0)]  # (prompt_len, completion_len); the last row has no completion
    length = max(p + c for p, c in layout) + 2
    input_ids = torch.full((len(layout), length), PAD)
    completion_mask = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(layout):
        input_ids[row, : prompt + completion] = torch.randint(1, VOCAB, (prompt + completion,), generator=generator)
        completion_mask[row, prompt : prompt + completion] = 1
        attention_mask[row, : prompt + completion] = 1
    logits = torch.randn(len(layout), length, VOCAB, generator=generator) * 3
    return logits, input_ids, completion_mask, attention_mask


def test_completion_mask_matches_loop_and_excludes_prompt_and_padding():
    logits, input_ids, completion_mask, _ = preference_batch()
    out = sequence_logps(logits, input_ids, completion_mask)
    expected, counts = loop_reference(logits, input_ids, completion_mask)
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps.double(), expected, rtol=0, atol=1e-5)
    assert out.num_tokens.tolist() == counts.tolist() == [4, 1, 6, 0]
    assert out.per_token.shape == out.mask.shape == (4, input_ids.shape[1] - 1)
    assert out.logps[3].item() == 0.0 and out.mean_logps[3].item() == 0.0
    torch.testing.assert_close(out.mean_logps[:3], out.logps[:3] / out.num_tokens[:3])


def test_ignore_index_labels_equal_completion_mask():
    logits, input_ids, completion_mask, _ = preference_batch(1)
    labels = input_ids.masked_fill(completion_mask == 0, -100)  # Hugging Face `labels`
    by_mask = sequence_logps(logits, input_ids, completion_mask)
    by_labels = sequence_logps(logits, labels)
    torch.testing.assert_close(by_labels.logps, by_mask.logps, rtol=0, atol=0)
    assert torch.equal(by_labels.num_tokens, by_mask.num_tokens)


def test_mask_and_ignore_index_combine():
    logits, input_ids, completion_mask, _ = preference_batch(2)
    labels = input_ids.clone()
    labels[2, 4] = -100  # inside row 2's completion (prompt length 2)
    counted = completion_mask.clone()
    counted[2, 4] = 0
    out = sequence_logps(logits, labels, completion_mask)
    expected, counts = loop_reference(logits, input_ids, counted)
    torch.testing.assert_close(out.logps.double(), expected, rtol=0, atol=1e-5)
    assert out.num_tokens.tolist() == counts.tolist()


def test_left_padding_and_attention_mask_as_loss_mask():
    logits, _, _, _ = preference_batch(3)
    input_ids = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    attention_mask = (input_ids != PAD).long()
    logits = logits[:2, :6]
    out = sequence_logps(logits, input_ids, attention_mask)
    expected, counts = loop_reference(logits, input_ids, attention_mask)
    torch.testing.assert_close(out.logps.double(), expected, rtol=0, atol=1e-5)
    assert counts.tolist() == [4, 5]  # the first position is never a target


def test_first_position_is_never_counted_when_shifting():
    logits, input_ids, _, _ = preference_batch(4)
    everything = torch.ones_like(input_ids)
    out = sequence_logps(logits, input_ids, everything)
    assert out.num_tokens.tolist() == [input_ids.shape[1] - 1] * input_ids.shape[0]


def test_pre_shifted_labels():
    logits, input_ids, completion_mask, _ = preference_batch(5)
    shifted = sequence_logps(logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:], shift_labels=False)
    unshifted = sequence_logps(logits, input_ids, completion_mask)
    torch.testing.assert_close(shifted.logps, unshifted.logps, rtol=0, atol=0)
    assert shifted.per_token.shape == unshifted.per_token.shape


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10_000])
def test_chunking_does_not_change_values_or_gradients(chunk_size):
    logits, input_ids, completion_mask, _ = preference_batch(6)
    logits.requires_grad_(True)
    default = sequence_logps(logits, input_ids, completion_mask)
    chunked = sequence_logps(logits, input_ids, completion_mask, chunk_size=chunk_size)
    torch.testing.assert_close(chunked.logps, default.logps, rtol=0, atol=0)
    weights = torch.tensor([0.3, -1.0, 2.0, 5.0])
    (grad_default,) = torch.autograd.grad((default.logps * weights).sum(), logits)
    (grad_chunked,) = torch.autograd.grad((chunked.logps * weights).sum(), logits)
    torch.testing.assert_close(grad_chunked, grad_default, rtol=0, atol=0)


def test_gradient_matches_log_softmax_gather():
    logits, input_ids, completion_mask, _ = preference_batch(7)
    logits.requires_grad_(True)
    naive = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    naive = (naive * completion_mask[:, 1:]).sum(dim=1)
    ours = sequence_logps(logits, input_ids, completion_mask, chunk_size=2)
    torch.testing.assert_close(ours.logps, naive, rtol=0, atol=1e-5)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (expected,) = torch.autograd.grad((naive * weights).sum(), logits)
    (actual,) = torch.autograd.grad((ours.logps * weights).sum(), logits)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)
    assert actual[:, -1].abs().sum() == 0  # the last position predicts nothing
    assert actual[3].abs().sum() == 0  # the row without completion tokens gets no gradient


def test_gradcheck_float64():
    logits, input_ids, completion_mask, _ = preference_batch(8)
    logits = logits[:, :6, :5].double().requires_grad_(True)
    input_ids = input_ids[:, :6] % 5
    assert torch.autograd.gradcheck(
        lambda x: sequence_logps(x, input_ids, completion_mask[:, :6], chunk_size=2).logps, (logits,)
    )


def test_bfloat16_logits_are_reduced_in_float32():
    logits, input_ids, completion_mask, _ = preference_batch(9)
    low = logits.bfloat16()
    out = sequence_logps(low, input_ids, completion_mask)
    assert out.logps.dtype == torch.float32
    expected, _ = loop_reference(low.float(), input_ids, completion_mask)
    torch.testing.assert_close(out.logps.double(), expected, rtol=0, atol=1e-5)
    low.requires_grad_(True)
    (grad,) = torch.autograd.grad(sequence_logps(low, input_ids, completion_mask).logps.sum(), low)
    assert grad.dtype == torch.bfloat16 and grad.shape == low.shape


def test_float64_logits_stay_float64():
    logits, input_ids, completion_mask, _ = preference_batch(10)
    out = sequence_logps(logits.double(), input_ids, completion_mask)
    expected, _ = loop_reference(logits, input_ids, completion_mask)
    assert out.logps.dtype == torch.float64
    torch.testing.assert_close(out.logps, expected, rtol=0, atol=1e-10)


def test_saves_no_vocabulary_sized_tensor_for_backward():
    """Unlike log_softmax, only the logits themselves (already alive) are kept for backward."""
    logits, input_ids, completion_mask, _ = preference_batch(11)
    logits.requires_grad_(True)
    vocab_sized = []

    def pack(saved):
        if saved.ndim and saved.shape[-1] == VOCAB and saved.data_ptr() != logits.data_ptr():
            vocab_sized.append(tuple(saved.shape))
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        sequence_logps(logits, input_ids, completion_mask).logps.sum()
    assert vocab_sized == []

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved):
        torch.log_softmax(logits, dim=-1).gather(-1, input_ids[..., None]).sum()
    assert vocab_sized  # the check above would catch a full log-softmax copy


def test_no_grad_reference_pass():
    logits, input_ids, completion_mask, _ = preference_batch(12)
    with torch.no_grad():
        out = sequence_logps(logits.requires_grad_(True), input_ids, completion_mask)
    assert not out.logps.requires_grad


def test_bool_mask_and_int32_labels():
    logits, input_ids, completion_mask, _ = preference_batch(13)
    reference = sequence_logps(logits, input_ids, completion_mask)
    other = sequence_logps(logits, input_ids.int(), completion_mask.bool())
    torch.testing.assert_close(other.logps, reference.logps, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"logits": torch.zeros(2, 5)}, ValueError, r"\(batch, seq_len, vocab\).*\(2, 5\)"),
        ({"logits": torch.zeros(2, 5, VOCAB, dtype=torch.long)}, ValueError, "floating"),
        ({"labels": torch.zeros(2, 5)}, TypeError, "integer.*float32"),
        ({"labels": torch.zeros(2, 4, dtype=torch.long)}, ValueError, r"\(2, 4\).*\(2, 5, 13\)"),
        ({"loss_mask": torch.ones(2, 4)}, ValueError, r"shape \(2, 5\).*\(2, 4\)"),
        ({"loss_mask": torch.full((2, 5), 0.5)}, ValueError, "only 0 and 1.*0.5"),
        ({"labels": torch.full((2, 5), VOCAB)}, ValueError, r"label id 13.*\[0, 13\)"),
        ({"labels": torch.full((2, 5), -7)}, ValueError, r"label id -7.*ignore_index=-100"),
        ({"chunk_size": 0}, ValueError, "chunk_size.*0"),
        ({"logits": [[0.0]]}, TypeError, "torch.Tensor"),
    ],
)
def test_input_errors(kwargs, error, match):
    arguments = {"logits": torch.zeros(2, 5, VOCAB), "labels": torch.zeros(2, 5, dtype=torch.long), **kwargs}
    with pytest.raises(error, match=match):
        sequence_logps(**arguments)


def test_out_of_vocab_ids_are_fine_where_not_counted():
    logits = torch.zeros(1, 4, VOCAB)
    labels = torch.tensor([[-1, 1, 2, 99]])
    out = sequence_logps(logits, labels, torch.tensor([[0, 1, 1, 0]]))
    torch.testing.assert_close(out.logps, torch.tensor([-2 * math.log(VOCAB)]))
