-- A record without an e-mail (an Apple or Google record: its provider id identifies it) is
-- staged with a NULL e-mail, as the user it makes has none, instead of the '' that stood for
-- it while the column was NOT NULL. A run staged before this migration and resumed after it
-- applies its records alike: their '' becomes NULL here.
ALTER TABLE tollhouse.import_staging ALTER COLUMN email DROP NOT NULL;
UPDATE tollhouse.import_staging SET email = NULL WHERE email = '';
