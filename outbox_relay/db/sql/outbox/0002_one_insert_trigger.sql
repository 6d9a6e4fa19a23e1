-- 0002: one trigger per inserted row instead of two. Every PL/pgSQL trigger call costs the
-- producer; folding the wake-up check into the ordering trigger halves that (the behaviour is
-- unchanged: same lock, same id drawing, NOTIFY only while a relay listens; a multi-row INSERT
-- now reads the one-row wake-up table per row, and PostgreSQL folds repeated notifications of a
-- transaction into one).

DROP TRIGGER outbox_order_v1 ON {{schema}}.outbox;
DROP TRIGGER outbox_wake_v1 ON {{schema}}.outbox;
DROP FUNCTION {{schema}}.outbox_order_v1();
DROP FUNCTION {{schema}}.outbox_wake_v1();

CREATE FUNCTION {{schema}}.outbox_before_insert_v2() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Commit order per aggregate: see 0001 (lock the aggregate's bucket, then draw the id).
    IF NEW.aggregate_id IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(1868724338, hashtext(NEW.aggregate_id) & 1023);
        NEW.id := nextval('{{schema}}.outbox_id_seq');
    END IF;
    -- Wake-up: ring only while a relay has said it is idle and listening; see 0001.
    IF EXISTS (SELECT FROM {{schema}}.outbox_relay_wakeup WHERE listening_until > now()) THEN
        PERFORM pg_notify('outbox_relay_v1.{{schema}}', '');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER outbox_before_insert_v2 BEFORE INSERT ON {{schema}}.outbox
    FOR EACH ROW EXECUTE FUNCTION {{schema}}.outbox_before_insert_v2();
