"""rm-serve: an HTTP reward server for RL loops (PPO, GRPO, best-of-n), with batching across requests.

    rm-serve --model OUT/reward.pt [--port 5000] [--max_wait_ms 5] [--api_key ... | RM_SERVE_API_KEY=...]
    # OpenRLHF: --remote_rm_url http://127.0.0.1:5000/get_reward

Endpoints and behaviour: rm_trainer/use/serve.py. Binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import sys
from dataclasses import fields

from rm_trainer.cli.parser import SHARE_HELP, SHARE_MODES, Parser, add_model_options, model_options, run
from rm_trainer.errors import UserError

PROG = "rm-serve"
HELP = {
    "host": "interface to bind; 0.0.0.0 exposes it to the network",
    "port": "TCP port",
    "api_key": "require 'Authorization: Bearer KEY' (or set RM_SERVE_API_KEY)",
    "max_wait_ms": "how long the first queued request waits for others to share its batch (0: no wait)",
    "max_batch_tokens": "padded tokens per forward",
    "max_batch_requests": "requests merged into one batch (1 turns batching across requests off)",
    "max_texts": "sequences per request",
    "max_chars": "characters per text",
    "max_body_bytes": "request body size",
    "shutdown_timeout_s": "time to finish queued requests on exit",
    "share_prompt": SHARE_HELP,
}


def parser() -> Parser:
    from rm_trainer.use.serve import ServeOptions

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_options(p, batch_tokens=False)
    for f in fields(ServeOptions):
        kind = str if f.type in ("str", "str | None") else {"int": int, "float": float}[f.type]
        p.add_argument(f"--{f.name}", type=kind, default=f.default, help=HELP[f.name],
                       choices=SHARE_MODES if f.name == "share_prompt" else None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def go() -> int:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            raise UserError("needs aiohttp: pip install 'rm_trainer[serve]'") from None
        from rm_trainer.use.serve import ServeOptions, serve

        opts = ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})
        serve(model_options(args).load(), opts, str(args.model))
        return 0

    return run(PROG, go)


if __name__ == "__main__":
    sys.exit(main())
