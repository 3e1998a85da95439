"""nsq-local: the NSQ4 KV-cache type for llama.cpp, with its numpy reference and tools."""

__version__ = "0.1.0"
