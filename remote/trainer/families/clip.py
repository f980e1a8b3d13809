"""The CLIP text stack that SD 1.x/2.x and SDXL share: kohya's tokenization into 75-token chunks and the
merging of the chunks' hidden states (kohya's strategy_sd / strategy_sdxl)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

# kohya's text-encoder LoRA targets: every Linear inside these (transformers' attention classes by backend)
CLIP_LORA_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")


def tokenize(tokenizers: Sequence[Any], captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
    """One [B, chunks, 77] id tensor per tokenizer; captions longer than 75 tokens use 75-token chunks."""
    length = (max_token_length or 75) + 2
    out = []
    for tokenizer in tokenizers:
        ids = tokenizer(
            captions, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        ).input_ids
        if length == 77:
            out.append(ids[:, None, :])
            continue
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        chunks = []
        for start in range(1, length - 2, 75):
            chunk = torch.cat([ids[:, :1], ids[:, start : start + 75], ids[:, -1:]], dim=1)
            if pad != eos:  # kohya: close every chunk with EOS, and mark an empty chunk as <BOS><EOS><PAD>...
                for row in chunk:
                    if row[-2] not in (eos, pad):
                        row[-1] = eos
                    if row[1] == pad:
                        row[1] = eos
            chunk[:, 0] = bos
            chunks.append(chunk)
        out.append(torch.stack(chunks, dim=1))
    return out


def hidden_states(encoder: Any, ids: torch.Tensor, layer_from_end: int | None, final_norm: bool) -> tuple[Any, Any]:
    """(the hidden state ``layer_from_end`` layers from the end, or the last one, and the encoder's output)."""
    output = encoder(ids, output_hidden_states=True)
    if layer_from_end is None:
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    else:
        hidden = output.hidden_states[-layer_from_end]
        if final_norm:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
    return hidden, output


def merge_chunks(states: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B*chunks, 77, C] -> [B, 2 + 75*chunks, C]: first BOS, each chunk's 75 inner tokens, last EOS."""
    if chunks == 1:
        return states
    batch = states.shape[0] // chunks
    states = states.view(batch, chunks, states.shape[1], states.shape[2])
    parts = [states[:, 0, :1]] + [states[:, i, 1:-1] for i in range(chunks)] + [states[:, -1, -1:]]
    return torch.cat(parts, dim=1)


def flat_ids(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[B, chunks, 77] -> [B*chunks, 77] on ``device``: each chunk through the encoder as its own row."""
    batch, chunks = ids.shape[:2]
    return ids.reshape(batch * chunks, -1).to(device)
