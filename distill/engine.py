"""Owns building the vLLM engine from its flags (CPU defaults included); must not render, sample or score.

Building the vLLM engine from CLI flags, with the CPU defaults kept in one place.

Stage scripts call `configure_env()` before anything imports vllm (vLLM reads its env vars at import time),
build their parser with `stage_parser(__doc__)`, add their own flags, then `add_engine_args(parser)` so every vLLM
engine flag (--max-model-len, --gpu-memory-utilization, --reasoning-parser, ...) is a flag of the stage, and call
`build_llm(args)` to start the engine.
"""

import argparse
import dataclasses
import os
import shutil
import textwrap

# Measured on a 2-core CPU box: without a KV-cache size vLLM claims most of RAM, the multiprocess engine costs
# start-up time and memory for nothing, and bf16 runs 3-6x slower than fp32.
CPU_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
    "VLLM_NO_USAGE_STATS": "1",
    "OMP_NUM_THREADS": str(os.cpu_count() or 1),
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",  # progress bars and our summaries stay readable; set INFO to see engine stats
}


def on_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def configure_env() -> None:
    if not on_gpu():
        for key, value in CPU_ENV.items():
            os.environ.setdefault(key, value)


def stage_parser(description: str):
    """vLLM's FlexibleArgumentParser (`--max_tokens` and `--max-tokens` both work, every engine flag can be added),
    with a `--help` that lists each of the stage's own flags with its help and default.

    vLLM's parser prints only group titles for a plain `--help` (its format_help collapses every group into a
    "Config Groups" list), which hid our flags too. Ours prints our groups in full and leaves vLLM's engine flags
    collapsed by group, with vLLM's own search for the rest: `--help=all`, `--help=ModelConfig` (a group),
    `--help=max-model-len` (flags naming a word)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser, SortedHelpFormatter, summary_line

    class StageHelpFormatter(SortedHelpFormatter):
        """vLLM's formatter (defaults shown, descriptions kept as written), in the order flags were declared."""

        def add_arguments(self, actions):
            argparse.HelpFormatter.add_arguments(self, actions)

    class StageParser(FlexibleArgumentParser):
        engine_actions: frozenset = frozenset()  # set by add_engine_args

        def error(self, message):
            # argparse prints the usage first, here hundreds of vLLM flags that bury the one line that matters
            self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

        def format_help(self):
            if self._search_keyword is not None:  # --help=<keyword>: vLLM's search, which sees every group
                return super().format_help()
            formatter = self._get_formatter()
            own = [action for action in self._actions if action not in self.engine_actions]
            formatter.add_usage(self.usage, own, self._mutually_exclusive_groups)
            formatter.add_text(self.description)
            for group in self._action_groups:
                actions = [action for action in group._group_actions if action not in self.engine_actions]
                if actions:
                    formatter.start_section(group.title)
                    formatter.add_text(group.description)
                    formatter.add_arguments(actions)
                    formatter.end_section()
            if self.engine_actions:
                formatter.start_section("vLLM engine flags, by group (--help=all lists every one, --help=<group> "
                                        "one group, --help=<word> the flags naming it, e.g. --help=max-model-len)")
                lines = []
                for group in self._action_groups:
                    engine = [action for action in group._group_actions if action in self.engine_actions]
                    if engine:  # a group of vLLM's, or ours holding the few flags vLLM adds to the parser itself
                        summary = summary_line(group.description) if len(engine) == len(group._group_actions) else (
                            " ".join(action.option_strings[0] for action in engine))
                        lines += textwrap.wrap(summary, 100, initial_indent=f"{group.title}: ",
                                               subsequent_indent="    ", break_on_hyphens=False) or [group.title]
                formatter.add_text("\n".join(lines))
                formatter.end_section()
            formatter.add_text(self.epilog)
            return formatter.format_help()

    return StageParser(description=description, formatter_class=StageHelpFormatter)


def add_engine_args(parser):
    from vllm.engine.arg_utils import EngineArgs

    ours = set(parser._actions)
    # Straight onto the parser: vLLM adds its groups (ModelConfig, CacheConfig, ...) to what it is given, and groups
    # nested in a group of ours were invisible to every --help, --help=all included.
    EngineArgs.add_cli_args(parser)
    parser.engine_actions = frozenset(action for action in parser._actions if action not in ours)
    parser.set_defaults(
        enable_prefix_caching=True,  # the long prompt is a shared prefix: computed once, reused by every query
        dtype="auto" if on_gpu() else "float32",
        seed=0,  # per-request seeds crash with chunked prefill on CPU; seed the engine instead
    )
    if not on_gpu():
        # torch.compile warm-up costs ~90 s per engine start on 2 cores (measured) and buys little for small models
        parser.set_defaults(enforce_eager=True)
    return parser


def engine_kwargs(args) -> dict:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineArgs) if hasattr(args, f.name)}


def build_llm(args, **overrides):
    from vllm import LLM

    return LLM(**{**engine_kwargs(args), **overrides})
