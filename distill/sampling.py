"""Owns sampling parameters (the model's defaults, then the user's flags); must not start an engine.

Sampling parameters: the model's defaults (its generation_config, as vLLM reads it) with only the flags a user set on
top; the one place every stage that generates (stages 0, 1, 3, the judge) takes them from. It must not start an engine:
a resumed run's settings are known, and checked, before any model loads.

    settings = expected_sampling(args, model_sampling_defaults(args), max_tokens)   # no engine: the resume check
    params = engine_sampling(llm, args, settings, structured_outputs=...)           # the engine's, checked against it
"""

# Sampling fields a user may set; each defaults to the model's generation_config (as vLLM reads it), then vLLM's.
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")
# The generation_config keys vLLM turns into default sampling parameters (vllm ModelConfig.get_diff_sampling_param).
GENERATION_CONFIG_KEYS = (*SAMPLING_FLAGS, "max_new_tokens")


def add_sampling_args(parser) -> None:
    group = parser.add_argument_group("sampling (unset: the model's generation_config, as vLLM reads it)")
    for flag, kind in zip(SAMPLING_FLAGS, (float, float, int, float, float, float, float)):
        group.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                           help=f"vLLM SamplingParams.{flag} (unset: the model's)")


def model_sampling_defaults(args) -> dict:
    """The model's default sampling parameters as vLLM derives them (LLM.get_default_sampling_params), read from
    the model's generation_config.json without starting an engine, so a resume check fails in seconds.
    Honours --generation-config (auto / vllm / a folder) and --override-generation-config."""
    from vllm.transformers_utils.config import try_get_generation_config

    source = args.generation_config
    config = {}
    if source != "vllm":
        found = try_get_generation_config(args.model if source == "auto" else source,
                                          trust_remote_code=args.trust_remote_code)
        config = found.to_diff_dict() if found else {}
    config.update(args.override_generation_config or {})
    defaults = {key: config[key] for key in GENERATION_CONFIG_KEYS if config.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def sampling_params(defaults, overrides: dict, **fixed):
    """`defaults` (a SamplingParams, e.g. from get_default_sampling_params()) with only the `overrides` that are set
    (None means "keep the model's"), plus `fixed` settings that are ours (max_tokens, the label constraint)."""
    from vllm import SamplingParams

    chosen = {flag: getattr(defaults, flag) for flag in SAMPLING_FLAGS}
    chosen.update({flag: value for flag, value in overrides.items() if value is not None})
    return SamplingParams(**chosen, **fixed)


def effective_sampling(params) -> dict:
    """What goes into run records: every field a user could set, as the engine will use it."""
    return {flag: getattr(params, flag) for flag in (*SAMPLING_FLAGS, "max_tokens")}


class EngineDefaultsError(RuntimeError):
    """vLLM's sampling defaults are not the ones read from the model's generation_config without the engine."""


def user_sampling(args) -> dict:
    return {flag: getattr(args, flag) for flag in SAMPLING_FLAGS}


def expected_sampling(args, model_defaults: dict, max_tokens: int) -> dict:
    """Sampling as the engine will apply it (`model_defaults`, from model_sampling_defaults, then the
    user's flags), known without starting the engine, so a resume check fails in seconds."""
    from vllm import SamplingParams

    params = sampling_params(SamplingParams.from_optional(**model_defaults), user_sampling(args), max_tokens=max_tokens)
    return effective_sampling(params)


def engine_sampling(llm, args, settings: dict, **fixed):
    """A started engine's SamplingParams for a run whose `settings` hold expected_sampling, plus `fixed` settings of
    ours (a constraint, logprobs, stop strings). EngineDefaultsError if vLLM's defaults are not the ones read
    without it: the resume check would have been wrong."""
    params = sampling_params(llm.get_default_sampling_params(), user_sampling(args), max_tokens=settings["max_tokens"],
                             **fixed)
    effective = effective_sampling(params)
    if effective != {key: settings[key] for key in effective}:
        raise EngineDefaultsError(f"vLLM's sampling defaults {effective} differ from the ones read from the model's "
                                  f"generation_config ({settings}); the resume check would be wrong")
    return params
