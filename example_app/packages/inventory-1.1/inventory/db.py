"""The package's own storage: an sqlite database opened by the app's lifespan."""

import sqlite3

STOCK = [("apple", 120), ("banana", 75), ("cherry", 300), ("damson", 40)]  # 1.1: a new sku


def open_database() -> sqlite3.Connection:
    # check_same_thread=False: Starlette may run sync code in worker threads.
    connection = sqlite3.connect(":memory:", check_same_thread=False)
    connection.execute("CREATE TABLE stock (sku TEXT PRIMARY KEY, quantity INTEGER NOT NULL)")
    connection.executemany("INSERT INTO stock VALUES (?, ?)", STOCK)
    return connection
