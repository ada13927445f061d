"""The RLHF step of ``benchmarks/ppo.py`` in plain PyTorch + transformers (no Megatron).

``PlainStep(algorithm, config_json, prompts).step()`` runs one PPO or GRPO step the way a careful
TRL user would write it. ``benchmarks/ppo.py`` runs one such step after each of its trainer's
episodes, so that "ours / plain" is a ratio that does not depend on the VM's drifting speed; on
its own (``main``) it shows what eager PyTorch costs for this workload.

Workload (ppo.py's): 8 responses x 16 new tokens per step (PPO: the next 8 prompts; GRPO: the
next 2 prompts x 4 samples, group-contiguous rows; ``rule=True``: scored by ``low_ids``, no
reward model), prompts given as token-id lists (ppo.py's:
BOS + the prompt, the last 32 tokens), 4 PPO epochs over one mini-batch of 8. Every role is a
LLaMA built from ``config_json`` (ppo.py's: 2 layers, hidden 32, FFN 128, 4 heads, 2 KV heads,
vocab 1000, rms eps 1e-6, untied embeddings), fp32, random init (``torch.manual_seed(seed)``),
transformers' default attention on CPU (``sdpa``): policy ``LlamaForCausalLM``; reference a
frozen copy of it; reward (frozen) and value (trainable, PPO only) ``LlamaModel`` + a
``Linear(hidden, 1)`` head on the final hidden states. ``torch.optim.AdamW`` (fused, lr 1e-5,
weight decay 0.01) for policy and value, ``clip_grad_norm_`` to 1.0.

One step: left-pad the prompts; ``policy.generate`` (pure sampling, KV cache, seeded with
``seed + step``); rows stay left-padded, the attention mask drops the padding and the tokens after
the first EOS, position ids count the attended tokens. Under ``no_grad``: old (PPO) and
reference log-probs (``log_softmax`` + ``gather``; logits only at the response positions, through
``logits_to_keep``), values (PPO) at the positions predicting each response token, the reward
score at the last response token. PPO: per-token reward -kl_coef * (old - ref) plus the score at
the last token, GAE, masked whitening of the advantages. GRPO: (score - group mean) /
(group std + 1e-6) at every response token, kl_coef x k3 KL to the reference in the loss. Then
``ppo_epochs`` x (policy: clipped surrogate, masked token mean, backward, clip, step; PPO: value,
clipped value loss 0.5 max(unclipped, clipped), masked mean, backward, clip, step). GRPO's old
log-probs are those of its first training forward, detached (one mini-batch: it runs the weights
that sampled), as in our trainer (``RLHFTrainer.old_from_training``).

What differs from our trainer: Megatron's model (its unfused core attention unless
``--use-flash-attn``, the vocabulary padded to 1024, rows right-padded), its sampler (inverse CDF)
and optimizer (Megatron's Adam with its grad-norm clipping); our trainer also computes the
policy's token entropy (a metric, in its scoring forward, or GRPO's first training forward) and
permutes the rows every epoch (one mini-batch: the same rows); here the reward and value heads start random, not from a checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel


class ScalarModel(torch.nn.Module):
    """``LlamaModel`` + a scalar head: ids [B, S] -> [B, S]."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.model = LlamaModel(config)
        self.head = torch.nn.Linear(config.hidden_size, 1)

    def forward(self, ids, attn, pos):
        h = self.model(input_ids=ids, attention_mask=attn, position_ids=pos,
                       use_cache=False).last_hidden_state
        return self.head(h).squeeze(-1)


def low_ids(prompts, responses, response_ids=None):
    """A rule-based reward (``module:function``, as the trainer calls one): the share of response
    tokens that are ordinary tokens with an id below 100 (0-4: special tokens, EOS among them)."""
    return [sum(5 <= t < 100 for t in ids) / max(len(ids), 1) for ids in response_ids]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def token_logprobs(model, ids, attn, pos, width: int) -> torch.Tensor:
    """log p(ids[:, -width:]) from the logits at the positions before them: [B, width]."""
    logits = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], position_ids=pos[:, :-1],
                   use_cache=False, logits_to_keep=width).logits
    return torch.log_softmax(logits, -1).gather(-1, ids[:, -width:, None]).squeeze(-1)


def values_at_actions(model, ids, attn, pos, width: int) -> torch.Tensor:
    """The value model's output at the positions predicting ids[:, -width:]: [B, width]."""
    return model(ids[:, :-1], attn[:, :-1], pos[:, :-1])[:, -width:]


class PlainStep:
    def __init__(self, algorithm: str, config_json: str, prompts: list[list[int]], *, samples=8,
                 group=4, new_tokens=16, ppo_epochs=4, lr=1e-5, pad_id=3, eos_id=2, seed=0,
                 kl_coef=0.05, clip=0.2, clip_value=0.2, gamma=1.0, lam=0.95, rule=False):
        """``rule``: the score is ``low_ids`` of the response, no reward model (GRPO's usual
        set-up)."""
        if algorithm not in ("ppo", "grpo"):
            raise ValueError(f"algorithm must be ppo or grpo, got {algorithm!r}")
        self.algorithm, self.prompts = algorithm, prompts
        self.group = group if algorithm == "grpo" else 1
        self.samples, self.new_tokens, self.ppo_epochs = samples, new_tokens, ppo_epochs
        self.pad_id, self.eos_id, self.seed, self.kl_coef = pad_id, eos_id, seed, kl_coef
        self.clip, self.clip_value, self.gamma, self.lam = clip, clip_value, gamma, lam
        self.consumed = self.steps = 0
        config = LlamaConfig.from_json_file(config_json)
        torch.manual_seed(seed)
        self.policy = LlamaForCausalLM(config).train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.reward = None if rule else ScalarModel(config).eval().requires_grad_(False)
        self.policy_opt = torch.optim.AdamW(self.policy.parameters(), lr=lr, fused=True)
        self.value = None
        if algorithm == "ppo":
            self.value = ScalarModel(config).train()
            self.value_opt = torch.optim.AdamW(self.value.parameters(), lr=lr, fused=True)

    def _batch(self):
        """The next prompts, each ``group`` times, left-padded: (ids, attention mask) [B, P]."""
        n = self.samples // self.group
        picked = [self.prompts[(self.consumed + i) % len(self.prompts)] for i in range(n)]
        self.consumed += n
        rows = [p for p in picked for _ in range(self.group)]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p):] = 1
        return ids, attn

    def step(self) -> dict:
        prompt, prompt_attn = self._batch()
        torch.manual_seed(self.seed + self.steps)
        self.steps += 1
        with torch.no_grad():
            ids = self.policy.generate(
                input_ids=prompt, attention_mask=prompt_attn, do_sample=True, top_k=0, top_p=1.0,
                temperature=1.0, max_new_tokens=self.new_tokens, pad_token_id=self.pad_id,
                eos_token_id=self.eos_id, use_cache=True)
            b, p = prompt.shape
            width = ids.shape[1] - p
            is_eos = (ids[:, p:] == self.eos_id).long()
            keep = (is_eos.cumsum(1) - is_eos == 0).long()  # [B, T]: up to and with the 1st EOS
            attn = torch.cat([prompt_attn, keep], 1)
            pos = (attn.cumsum(1) - 1).clamp_min(0)
            mask = keep.float()
            length = keep.sum(1)
            # GRPO, one mini-batch: the first training forward gives the old log-probs (as
            # RLHFTrainer.old_from_training); PPO needs them now (the KL penalty in the rewards)
            old = None if self.value is None else token_logprobs(self.policy, ids, attn, pos,
                                                                 width)
            ref = token_logprobs(self.reference, ids, attn, pos, width)
            if self.reward is None:
                score = torch.tensor(low_ids(None, None, [ids[i, p:p + n].tolist()
                                                          for i, n in enumerate(length.tolist())]))
            else:
                score = self.reward(ids, attn, pos)[torch.arange(b), p + length - 1]
            if self.value is None:
                g = score.view(-1, self.group)
                adv = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).view(-1)
                advantages = adv[:, None] * mask
            else:
                old_values = values_at_actions(self.value, ids, attn, pos, width) * mask
                rewards = -self.kl_coef * (old - ref) * mask
                rewards[torch.arange(b), length - 1] += score
                last, rev = torch.zeros(b), []
                for t in reversed(range(width)):
                    nxt = old_values[:, t + 1] if t + 1 < width else torch.zeros(b)
                    last = rewards[:, t] + self.gamma * nxt - old_values[:, t] + \
                        self.gamma * self.lam * last
                    rev.append(last)
                raw = torch.stack(rev[::-1], 1)
                returns = raw + old_values
                mean = masked_mean(raw, mask)
                var = masked_mean((raw - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
                advantages = (raw - mean) * torch.rsqrt(var + 1e-8) * mask
        for _ in range(self.ppo_epochs):
            logp = token_logprobs(self.policy, ids, attn, pos, width)
            if old is None:
                old = logp.detach()
            ratio = torch.exp(logp - old)
            loss = torch.maximum(-advantages * ratio,
                                 -advantages * ratio.clamp(1 - self.clip, 1 + self.clip))
            if self.value is None:
                r = ref - logp
                loss = loss + self.kl_coef * (torch.exp(r) - r - 1)
            policy_loss = masked_mean(loss, mask)
            policy_loss.backward()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            self.policy_opt.step()
            self.policy_opt.zero_grad()
            if self.value is not None:
                v = values_at_actions(self.value, ids, attn, pos, width)
                v_clip = old_values + (v - old_values).clamp(-self.clip_value, self.clip_value)
                value_loss = 0.5 * masked_mean(
                    torch.maximum((v - returns) ** 2, (v_clip - returns) ** 2), mask)
                value_loss.backward()
                torch.nn.utils.clip_grad_norm_(self.value.parameters(), 1.0)
                self.value_opt.step()
                self.value_opt.zero_grad()
        return {"reward_mean": score.mean().item(), "response_length": length.float().mean().item(),
                "kl": ((old - ref) * mask).sum(1).mean().item(), "policy_loss": policy_loss.item()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="an HF LLaMA config.json")
    ap.add_argument("--prompts", required=True, help="jsonl of {'prompt': text}")
    ap.add_argument("--tokenizer", required=True, help="a folder with tokenizer.json")
    ap.add_argument("--algorithms", default="ppo,grpo,grpo_rule",
                    help="grpo_rule: GRPO scored by low_ids, no reward model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-prompt-length", type=int, default=32)
    a = ap.parse_args()
    from tokenizers import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_file(f"{a.tokenizer}/tokenizer.json")
    bos = tok.token_to_id("<s>")
    with open(a.prompts, encoding="utf-8") as f:
        prompts = [([bos] + tok.encode(json.loads(line)["prompt"]).ids)[-a.max_prompt_length:]
                   for line in f if line.strip()]
    print(f"plain transformers step on CPU fp32, 1 thread, torch {torch.__version__}; median CPU "
          f"s/step of {a.steps} steps after {a.warmup} warm-up")
    print("| algorithm | CPU s/step |    min |    max | response tokens |")
    print("|-----------|------------|--------|--------|-----------------|")
    for algo in a.algorithms.split(","):
        runner = PlainStep(algo.replace("_rule", ""), a.config, prompts, rule=algo == "grpo_rule")
        for _ in range(a.warmup):
            runner.step()
        times, lengths = [], []
        for _ in range(a.steps):
            t0 = time.process_time()
            m = runner.step()
            times.append(time.process_time() - t0)
            lengths.append(m["response_length"])
        print(f"| {algo.upper():9} | {statistics.median(times):10.4f} | {min(times):6.4f} | "
              f"{max(times):6.4f} | {statistics.mean(lengths):15.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
