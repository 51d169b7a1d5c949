"""Names shared by the migrations, the pool and row-level security policies.

See docs/rls.md for the pattern every owned table follows.
"""

from typing import Final

#: The role the service acts as at run time. It owns no table and cannot bypass RLS;
#: every table's policies grant it what it manages.
SERVICE_ROLE: Final = "tollhouse_service"
#: The role of end-user queries. It owns no table, cannot bypass RLS, and sees only what
#: policies keyed on `tollhouse.current_user_id()` allow.
END_USER_ROLE: Final = "tollhouse_user"
#: The transaction-local setting that carries the acting user's id.
ACTING_USER_SETTING: Final = "tollhouse.user_id"
#: The schema of every Tollhouse object.
SCHEMA: Final = "tollhouse"
