"""ernieserve: an LLM inference and serving engine for the ERNIE 4.5 family."""

from ernieserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):  # keep `import ernieserve` light: torch loads only when LLM is used
    if name == "LLM":
        from ernieserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
