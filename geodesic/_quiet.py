"""One warning filter, installed when geodesic is imported.

PyTorch 2.11 warns on the first forward-mode AD call in a process that *its own* jvp decompositions use
torch.jit.script (torch/_decomp/decompositions_for_jvp.py): nothing a user can act on, and it was printed on every
CLI run and in the server's log. Only that message from that module is silenced.
"""
import warnings

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
