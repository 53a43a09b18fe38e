"""Embedding edgemesh in an app: connect to the local node, list models, stream a completion.

    python examples/embed_client.py [--api URL] [--model NAME] [--prompt TEXT] [--max-tokens N]

Without ``--api`` the client finds the local node through the default data dir; without
``--model`` it uses the first model the mesh offers.
"""

import argparse
import asyncio

from mesh import MeshClient


async def main(api: str | None, model: str | None, prompt: str, max_tokens: int) -> None:
    async with MeshClient(api) as client:
        names = [m["id"] for m in await client.models()]
        print("models:", ", ".join(names) or "(none: add one with `edgemesh model add`)")
        model = model or names[0]
        print(prompt, end="", flush=True)
        async for text in client.generate(model, prompt, max_tokens=max_tokens):
            print(text, end="", flush=True)  # greedy (temperature 0) unless you ask otherwise
        s = client.last_summary
        hops = len(s["stages"])
        print(
            f"\n[{model}: {len(s['tokens'])} tokens over {hops} stage(s), "
            f"TTFT {s['ttft_ms']:.0f} ms, {s['tokens_per_s']:.1f} tokens/s]"
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--api", default=None, help="node API URL (default: the local node)")
    ap.add_argument("--model", default=None, help="model name (default: the first listed)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-tokens", type=int, default=32)
    a = ap.parse_args()
    asyncio.run(main(a.api, a.model, a.prompt, a.max_tokens))
