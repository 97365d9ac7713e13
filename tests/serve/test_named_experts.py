"""The server steers a MoCaE of four named experts by their names (issue 15 part 6)."""

import pytest

from mocae.mixture.model import MoCaEConfig, MoCaEModel

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
MODEL = "tiny-mocae"  # the id the conftest's `serve` fixture gives the model


def test_four_named_experts_are_served_and_steered_by_name(named_expert_dirs, serve):
    import httpx2 as httpx  # the HTTP client the openai package ships with here

    # the router as built (torch's random init): routing is the softmax of its logits
    model = MoCaEModel.build(MoCaEConfig(backbone="tiny-random", experts=named_expert_dirs, router_input="hidden"))
    names = ["helpful", "harmless", "honest", "concise"]
    with serve(model) as srv:
        client = srv.client()
        assert httpx.get(srv.url + f"/v1/models/{MODEL}").json()["axes"] == names
        routed = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=2)
        assert list(routed.routing["probabilities"]) == names
        assert sum(routed.routing["weights"].values()) == pytest.approx(1, abs=1e-5)
        steered = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=2, extra_body={"axis_weights": {"concise": 1}})
        assert steered.routing["weights"] == {"helpful": 0.0, "harmless": 0.0, "honest": 0.0, "concise": 1.0}
        top1 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                              extra_body={"routing_mode": "top1", "prior": {"concise": 1000}})
        assert top1.routing["weights"] == {"helpful": 0.0, "harmless": 0.0, "honest": 0.0, "concise": 1.0}
        with pytest.raises(openai.BadRequestError, match="unknown axes"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"axis_weights": {"funny": 1}})
