"""A deliberately naive, loop-per-position transcription of the method as docs/method.md states it,
independent of the model's vectorised code: no relative shift, no gathers, one query row at a time.
Used as the oracle for the single-device model. Eval mode only (no dropout)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def phi(delta: float, d: int, clamp_len: int) -> torch.Tensor:
    if clamp_len > 0:
        delta = min(delta, clamp_len)
    k = torch.arange(d // 2, dtype=torch.float64)
    omega = 10000.0 ** (-2 * k / d)
    return torch.cat([torch.sin(delta * omega), torch.cos(delta * omega)])


def layer_norm(x, ln):
    return F.layer_norm(x, x.shape[-1:], ln.weight.double(), ln.bias.double(), ln.eps)


class SpecModel:
    """Runs a LaMemoModel's weights through the equations of docs/method.md §4-§5, in float64."""

    def __init__(self, model):
        self.m = model
        self.c = model.config

    def W(self, linear):
        return linear.weight.detach().double()

    def r(self, attn, delta):
        return (self.W(attn.r_proj) @ phi(delta, self.c.d_model, self.c.clamp_len)).view(self.c.n_head, self.c.d_head)

    def ffn(self, layer, x):
        ff = layer.ff
        inp = layer_norm(x, ff.norm) if self.c.pre_lnorm else x
        h = torch.relu(inp @ self.W(ff.fc1).T + ff.fc1.bias.double())
        out = h @ self.W(ff.fc2).T + ff.fc2.bias.double()
        return x + out if self.c.pre_lnorm else layer_norm(x + out, ff.norm)

    def run_segment(self, tokens, memory, mem_len):
        """tokens: [B, N]; memory: dict or None. Returns (nll [B, N], new memory dict)."""
        c, m = self.c, self.m
        B, N = tokens.shape
        H, dh = c.n_head, c.d_head
        s = 1.0 / math.sqrt(dh)
        u = m.content_bias.detach().double()
        v = m.position_bias.detach().double()
        vp = m.future_position_bias.detach().double() if m.future_position_bias is not None else None
        up = m.future_content_bias.detach().double() if m.future_content_bias is not None else None
        emb = m.embedding.weight.detach().double()[tokens] * math.sqrt(c.d_model)        # [B, N, d]
        lookahead = c.variant != 0
        if memory is None:
            memory = {"emb": emb[:, :0], "C": [None] * c.n_layer, "Z": [None] * c.n_layer,
                      "hid": [emb[:, :0]] * (c.n_layer - 1)}
        M = memory["emb"].shape[1]
        new = {"emb": torch.cat([memory["emb"], emb], 1), "C": [], "Z": [], "hid": []}
        z = torch.cat([memory["emb"], emb], 1)      # LaMemo: [m; h]
        h_cur = emb                                  # XL: current rows
        for li, layer in enumerate(m.layers):
            attn = layer.attn
            if lookahead:
                x = z
            else:
                x = torch.cat([([memory["emb"]] + memory["hid"])[li], h_cur], 1)
                if li > 0:
                    new["hid"].append(x)
            T = x.shape[1]
            xn = layer_norm(x, attn.norm) if c.pre_lnorm else x
            q = (xn @ self.W(attn.q_proj).T).view(B, T, H, dh)
            k = (xn @ self.W(attn.k_proj).T).view(B, T, H, dh)
            vv = (xn @ self.W(attn.v_proj).T).view(B, T, H, dh)
            vec = torch.zeros(B, T, H, dh, dtype=torch.float64)
            lse = torch.zeros(B, T, H, dtype=torch.float64)
            for t in range(M, T):               # causal rows
                logits = torch.stack([((q[:, t] + u) * k[:, j]).sum(-1) + ((q[:, t] + v) * self.r(attn, t - j)).sum(-1)
                                      for j in range(t + 1)], -1) * s            # [B, H, t+1]
                p = torch.softmax(logits, -1)
                vec[:, t] = torch.einsum("bhj,jbhd->bhd", p, vv[:, :t + 1].transpose(0, 1))
                lse[:, t] = torch.logsumexp(logits, -1)
            if lookahead and M > 0:
                for i in range(M):
                    if c.variant == 33:
                        keys = [p for p in range(max(1, M - N + 1), M + 1)]
                    else:
                        keys = [p for p in range(max(1, M - N + 1), M + 1) if p > i]
                    cols = []
                    for p in keys:
                        cu = up if c.variant == 32 else u
                        if c.variant == 31:
                            pos = ((q[:, i] + v) * self.r(attn, -(p - i))).sum(-1)
                        else:
                            pos = ((q[:, i] + vp) * self.r(attn, abs(p - i))).sum(-1)
                        cols.append(((q[:, i] + cu) * k[:, p]).sum(-1) + pos)
                    logits = torch.stack(cols, -1) * s
                    pr = torch.softmax(logits, -1)
                    a = torch.einsum("bhj,jbhd->bhd", pr, vv[:, keys].transpose(0, 1))
                    zp = torch.logsumexp(logits, -1)
                    zb, cb = memory["Z"][li][:, i].double(), memory["C"][li][:, i].double()
                    kk = torch.maximum(zb, zp)
                    alpha = (torch.exp(zb - kk) / (torch.exp(zb - kk) + torch.exp(zp - kk) + 1e-6))[..., None]
                    vec[:, i] = alpha * cb + (1 - alpha) * a
                    lse[:, i] = torch.logaddexp(zb, zp)
            rows = slice(0, T) if lookahead else slice(M, T)
            out = vec[:, rows].reshape(B, -1, H * dh) @ self.W(attn.o_proj).T
            resid = x[:, rows]
            out = resid + out if c.pre_lnorm else layer_norm(resid + out, attn.norm)
            out = self.ffn(layer, out)
            if lookahead:
                z = out
                new["C"].append(vec)
                new["Z"].append(lse)
            else:
                h_cur = out
        hidden = z[:, M:] if lookahead else h_cur
        logits = hidden @ emb_weight(m).T + m.output_bias.detach().double()
        keep = lambda t: t[:, max(0, t.shape[1] - mem_len):]  # noqa: E731
        new = {"emb": keep(new["emb"]), "C": [keep(t) for t in new["C"]], "Z": [keep(t) for t in new["Z"]],
               "hid": [keep(t) for t in new["hid"]]}
        return logits, new


def emb_weight(model):
    return model.embedding.weight.detach().double()
