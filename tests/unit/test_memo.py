"""natgwd.state.memo.RoundMemo: results reused from the previous state, and only from it."""

from __future__ import annotations

from natgwd.state.memo import RoundMemo


def test_results_are_computed_once_and_kept_for_one_more_round() -> None:
    calls: list[int] = []

    def square(n: int) -> int:
        calls.append(n)
        return n * n

    memo = RoundMemo(square)
    assert [memo(2), memo(3), memo(2)] == [4, 9, 4]
    memo.next_round()
    assert memo(2) == 4  # from the previous round
    memo.next_round()
    assert memo(2) == 4
    assert memo(3) == 9  # unused last round: computed again
    assert calls == [2, 3, 3]
