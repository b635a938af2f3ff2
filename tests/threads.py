"""Running one function in several threads at once, for the tests of shared models and caches."""
import threading
from typing import Callable, List, Sequence


def run_in_threads(work: Callable, args: Sequence[tuple]) -> List[BaseException]:
    """``work(*a)`` for each ``a`` in ``args``, each in its own thread, all at once; the exceptions raised."""
    errors: List[BaseException] = []

    def guarded(*a):
        try:
            work(*a)
        except Exception as e:  # noqa: BLE001 - returned to the test
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=a) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
