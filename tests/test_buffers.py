"""BufferPool: buffers are reused once free, and free ones beyond a budget are given back."""

from blockrep.shell.buffers import BufferPool

MiB = 1 << 20


def test_trim_gives_back_free_buffers_beyond_the_budget():
    pool = BufferPool()
    views = [pool.get(MiB) for _ in range(20)]  # a burst: 20 buffers in use at once
    assert len(pool) == 20
    assert pool.trim(4 * MiB) == 0  # all in use: nothing to give back
    keep = views[:2]
    del views
    assert pool.trim(4 * MiB) == 14 * MiB  # 18 free: 4 MiB of them stay
    assert len(pool) == 2 + 4
    del keep
    again = pool.get(MiB)  # a kept buffer is reused, none allocated
    assert len(pool) == 6 and again.obj is not None
