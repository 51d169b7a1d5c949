-- Health and doctor checks (tollhouse.health.service).

-- name: ping
SELECT 1

-- name: roles
-- The runtime roles must not be able to bypass RLS nor own what policies protect.
SELECT r.rolname, r.rolsuper, r.rolbypassrls,
       (SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid) AS owned
FROM pg_roles r
WHERE r.rolname = ANY(%(roles)s)
ORDER BY r.rolname

-- name: tables_without_forced_rls
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s
  AND c.relkind IN ('r', 'p')
  AND NOT (c.relrowsecurity AND c.relforcerowsecurity)
  AND c.relname <> ALL(%(allowed)s)
ORDER BY c.relname

-- name: runtime_role
SELECT a.rolname, a.rolsuper, a.rolbypassrls, l.rolname, l.rolsuper
FROM pg_roles a, pg_roles l
WHERE a.rolname = current_user AND l.rolname = session_user

-- name: unsafe_functions
-- Functions must pin their search_path and must not be callable by PUBLIC (RELIABILITY R-07).
SELECT p.proname,
       NOT coalesce(EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search_path=%%'),
                    false) AS unpinned,
       EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
               WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_execute
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s
ORDER BY p.proname
