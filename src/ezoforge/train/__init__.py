import logging

# bitsandbytes warns on import that an optional hub kernel for CPU 4-bit is missing (it needs the network to fetch);
# its built-in CPU path works, so the warning only misleads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
