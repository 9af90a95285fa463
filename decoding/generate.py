"""
Caption generation with an LVLM (model.py). The image prefix is read once and every token after
it costs one position, not the whole sequence again: a KV cache keeps the keys and values of what
was read. Three ways to choose tokens:

  greedy       the likeliest next token (temperature 0, beam 1)
  sampled      from the temperature-scaled distribution, optionally from its top_k tokens only
  beam search  keep the `beam` best partial captions of each image (beam_search below)

Each of them can read a `debias` (reference.Debias) beside the model: its text-only reference reads
the same tokens with a KV cache of its own, and every step's log-probabilities are corrected by it.
"""

import torch
import torch.nn.functional as F


class KVCache:
    """The keys and values of every position a GPT has read, per layer (model.SelfAttention
    appends to it), and how many text positions that was (the next token's position)."""

    def __init__(self, n_layer):
        self.k, self.v, self.text_len = [None] * n_layer, [None] * n_layer, 0

    def extend(self, layer, k, v):
        """Append the new positions' keys and values [B,H,T,D]; return all of them."""
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def select(self, rows):
        """Keep the sequences at `rows` (repeated or reordered), as beam search moves its hypotheses."""
        self.k, self.v = [k[rows] for k in self.k], [v[rows] for v in self.v]


class NextToken:
    """Log-probabilities [N,V] of the next token of N captions being written, one token at a time:
    call it with each caption's latest token (BOS first). `copies` repeats each image's row; with
    `debias`, they are corrected by its reference, which reads the same tokens."""

    def __init__(self, model, images, copies=1, debias=None):
        self.model, self.prefix = model, model.image_prefix(images).repeat_interleave(copies, 0)
        self.cache = KVCache(model.lm.config.n_layer)
        self.debias = debias
        self.ref_cache = KVCache(debias.reference.config.n_layer) if debias else None

    def __call__(self, tokens):
        prefix, self.prefix = self.prefix, None                # the image is read with the first token
        logits = self.model.lm(tokens[:, None], prefix=prefix, cache=self.cache)[:, -1]
        if self.debias is None:
            return F.log_softmax(logits.float(), dim=-1)
        return self.debias(logits, self.debias.reference(tokens[:, None], cache=self.ref_cache)[:, -1])

    def select(self, rows):
        self.cache.select(rows)
        if self.ref_cache is not None:
            self.ref_cache.select(rows)


def n_steps(model, max_new_tokens):
    return min(max_new_tokens, model.lm.config.block_size - 1)


@torch.no_grad()
def generate(model, images, bos, eot, max_new_tokens, temperature=0.0, top_k=None, beam=1, length_penalty=0.0,
             debias=None):
    """Caption each image: greedy (temperature 0), sampled (optionally top-k), or with beam > 1 by
    beam search; with `debias`, from the corrected distribution. Returns one list of token ids per image, without BOS; a caption that ended early
    ends in EOT (greedy and sampled repeat it to the longest one's length), so callers cut at the first EOT."""
    if beam > 1:
        return beam_search(model, images, bos, eot, max_new_tokens, beam, length_penalty, debias)
    next_token = NextToken(model, images, debias=debias)
    tokens = torch.full((images.size(0),), bos, dtype=torch.long, device=images.device)
    done = torch.zeros(images.size(0), dtype=torch.bool, device=images.device)
    out = []
    for _ in range(n_steps(model, max_new_tokens)):
        logp = next_token(tokens)
        if temperature == 0:
            tokens = logp.argmax(dim=-1)
        else:
            logp = logp / temperature
            if top_k is not None:
                kth = torch.topk(logp, min(top_k, logp.size(-1))).values[:, -1:]
                logp = logp.masked_fill(logp < kth, float('-inf'))
            tokens = torch.multinomial(F.softmax(logp, dim=-1), 1).squeeze(1)
        tokens = torch.where(done, torch.full_like(tokens, eot), tokens)
        out.append(tokens)
        done |= tokens == eot
        if done.all():
            break
    return torch.stack(out, dim=1).tolist() if out else [[] for _ in range(images.size(0))]


def normalised(score, length, length_penalty):
    """A hypothesis's rank score: its log-probability / length^length_penalty (0: the plain
    log-probability, which favours short captions; 1: the mean per token)."""
    return score / length ** length_penalty


@torch.no_grad()
def beam_search(model, images, bos, eot, max_new_tokens, beam, length_penalty=0.0, debias=None):
    """The best caption of each image under normalised(), searched with `beam` hypotheses per image,
    all images at once. Each step extends every live hypothesis by every token and ranks the 2*beam
    best extensions of each image by log-probability: those ending in EOT within the first `beam`
    are finished (their length counts the EOT) and never grow again; the `beam` best others live on.
    An image is done once it has `beam` finished captions and no live one can still beat the
    worst (its log-probability only falls, and its length is at most the step limit). Live
    hypotheses that reach the limit are finished as they are. beam=1 is greedy decoding."""
    B, K, device = images.size(0), beam, images.device
    next_token = NextToken(model, images, copies=K, debias=debias)
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = torch.full((B, K), float('-inf'), device=device)
    scores[:, 0] = 0.0                                     # one empty hypothesis to start from
    seqs = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    finished = [[] for _ in range(B)]                      # per image: (normalised score, tokens), best first
    steps = n_steps(model, max_new_tokens)
    for step in range(steps):
        logp = next_token(tokens).view(B, K, -1)
        top, flat = (scores[..., None] + logp).view(B, -1).topk(2 * K, dim=1)   # sorted, best first
        source, token = flat // logp.size(-1), flat % logp.size(-1)
        ends = (token == eot) & top.isfinite()
        for b, j in (ends[:, :K]).nonzero().tolist():
            keep_best(finished[b], normalised(top[b, j].item(), step + 1, length_penalty),
                      seqs[b, source[b, j]].tolist() + [eot], K)
        live = torch.sort(ends.long(), dim=1, stable=True).indices[:, :K]     # the K best that do not end
        scores, source, token = top.gather(1, live), source.gather(1, live), token.gather(1, live)
        seqs = torch.cat([seqs.gather(1, source[..., None].expand(-1, -1, seqs.size(2))), token[..., None]], dim=2)
        next_token.select((source + torch.arange(B, device=device)[:, None] * K).view(-1))
        tokens = token.view(-1)
        best_possible = normalised(scores.max(dim=1).values, steps, length_penalty).tolist()
        if all(len(f) == K and f[-1][0] >= bound for f, bound in zip(finished, best_possible)):
            break
    else:
        for b in range(B):                                 # the step limit: live hypotheses end as they are
            for k in range(K):
                if scores[b, k].isfinite():
                    keep_best(finished[b], normalised(scores[b, k].item(), steps, length_penalty),
                              seqs[b, k].tolist(), K)
    return [f[0][1] if f else [] for f in finished]


def keep_best(hypotheses, score, tokens, k):
    """Insert (score, tokens) into the best-first list `hypotheses`, keeping at most k."""
    hypotheses.append((score, tokens))
    hypotheses.sort(key=lambda h: -h[0])
    del hypotheses[k:]
