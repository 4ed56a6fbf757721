"""tokenloom.common: the ground floor. Errors, value checks, file I/O and atomic writes, lazy
re-exports, and the guard that keeps the checkout's folders from shadowing installed packages.

Pure Python: nothing here imports torch, numpy or any other tokenloom package, and every other
package may import it.
"""

from __future__ import annotations

from tokenloom.common.shadow import hand_back

hand_back(__name__, __file__)  # imported by its bare name from the checkout: the installed package wins
