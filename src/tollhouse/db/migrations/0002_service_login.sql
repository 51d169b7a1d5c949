-- The service logs in as tollhouse_service itself (on the embedded server, and wherever
-- TOLLHOUSE_SERVICE_DATABASE_URL names it), so its sessions are never a superuser's and
-- RESET ROLE leads nowhere. It may switch to tollhouse_user for end-user transactions.
ALTER ROLE tollhouse_service LOGIN;
GRANT tollhouse_user TO tollhouse_service;
