"""torch.compile(fullgraph=True) of fastbert.BertModel: no graph break (fullgraph raises on one), same forward
outputs and same gradients as eager. One compile (forward and backward are traced together), on a tiny config."""

from __future__ import annotations

import torch


def test_compile_fullgraph_matches_eager(make_config, make_pair, make_batch):
    config = make_config()
    hf, fb = make_pair("BertModel", config, seed=12)
    batch = make_batch(config, seed=7)  # padded: the key-padding mask goes through the compiled attention
    torch._dynamo.reset()
    compiled = torch.compile(fb, fullgraph=True, dynamic=False)

    def run(model):
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
        grads = {n: p.grad.clone() for n, p in fb.named_parameters()}
        return out, grads

    eager_out, eager_grads = run(fb)
    compiled_out, compiled_grads = run(compiled)
    with torch.no_grad():
        hf_out = hf(**batch)
    real = batch["attention_mask"].bool()
    for name in ("last_hidden_state", "pooler_output"):
        c, e, h = compiled_out[name].detach(), eager_out[name].detach(), hf_out[name]
        if name == "last_hidden_state":
            c, e, h = c[real], e[real], h[real]
        torch.testing.assert_close(c, e, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name} vs eager: {m}")
        torch.testing.assert_close(c, h, rtol=0, atol=1e-5, msg=lambda m, name=name: f"{name} vs transformers: {m}")
    assert compiled_grads.keys() == eager_grads.keys()
    scale = max(g.abs().max().item() for g in eager_grads.values())
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"grad {name}: {m}")
