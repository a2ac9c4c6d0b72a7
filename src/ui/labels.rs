//! The console's words in Russian (the default, as the messages are) and
//! English. A label is a field, so a missing translation does not compile.

use crate::domain::DeliveryState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Ru,
    En,
}

impl Lang {
    pub const COOKIE: &'static str = "chatbridge_lang";

    pub fn parse(code: &str) -> Option<Self> {
        match code {
            "ru" => Some(Self::Ru),
            "en" => Some(Self::En),
            _ => None,
        }
    }

    pub fn labels(self) -> &'static Labels {
        match self {
            Self::Ru => &RU,
            Self::En => &EN,
        }
    }
}

macro_rules! labels {
    ($($field:ident: $ru:expr, $en:expr;)*) => {
        pub struct Labels { $(pub $field: &'static str,)* }
        pub const RU: Labels = Labels { $($field: $ru,)* };
        pub const EN: Labels = Labels { $($field: $en,)* };
    };
}

labels! {
    lang: "ru", "en";
    other_lang: "en", "ru";
    other_lang_name: "English", "Русский";
    product: "chatbridge", "chatbridge";
    overview: "Обзор", "Overview";
    deliveries: "Доставки", "Deliveries";
    playground: "Песочница шаблонов", "Template playground";
    logout: "Выйти", "Log out";
    login_title: "Вход в консоль", "Console login";
    login_hint: "Введите токен администратора (admin.token).", "Enter the admin token (admin.token).";
    token: "Токен", "Token";
    sign_in: "Войти", "Log in";
    bad_token: "Неверный токен.", "Wrong token.";
    business: "Магазин (business)", "Business";
    queued: "В очереди", "Queued";
    sending: "Отправляется", "Sending";
    held: "Задержано", "Held";
    dead: "Не доставлено", "Dead";
    failed: "Ошибка шаблона", "Failed";
    delivered: "Доставлено", "Delivered";
    cancelled: "Отменено", "Cancelled";
    quota: "Квота", "Quota";
    quota_left: "осталось", "left";
    quota_resets: "освободится", "frees at";
    paused: "Пауза от Маркета", "Market pause";
    until: "до", "until";
    held_because: "Задержано: ", "Held: ";
    drain: "Разбор очереди", "Backlog drains in";
    now: "сейчас", "now";
    oldest_queued: "самая старая в очереди", "oldest queued";
    config_version: "Версия конфигурации", "Configuration version";
    last_reload: "Последняя перезагрузка", "Last reload";
    reload_ok: "применена", "applied";
    reload_refused: "отклонена", "refused";
    never: "не было", "none yet";
    nothing_queued: "Очередь пуста: ни одной ожидающей или проблемной доставки.", "Nothing waits and nothing is stuck.";
    refreshes: "Обновляется само каждые 10 секунд.", "Refreshes by itself every 10 seconds.";
    state: "Состояние", "State";
    any: "любое", "any";
    chat: "Чат", "Chat";
    order: "Заказ", "Order";
    return_label: "Возврат", "Return";
    route: "Маршрут", "Route";
    source: "Источник", "Source";
    since: "С (RFC 3339)", "Since (RFC 3339)";
    until_time: "По (RFC 3339)", "Until (RFC 3339)";
    per_page: "На странице", "Per page";
    find: "Найти", "Find";
    reset: "Сбросить", "Reset";
    next_page: "Следующая страница →", "Next page →";
    first_page: "← В начало", "← First page";
    none_found: "Ничего не найдено.", "Nothing found.";
    created: "Создана", "Created";
    attempts: "Попытки", "Attempts";
    reason: "Причина", "Reason";
    event: "Событие", "Event";
    event_type: "Тип события", "Event type";
    text: "Текст", "Text";
    no_text: "(текст не создан)", "(no text rendered)";
    chars: "символов", "characters";
    retry: "Отправить заново", "Retry";
    retry_hint: "Текст будет создан заново по текущим шаблонам.", "The text is rendered again with the current templates.";
    cancel: "Отменить", "Cancel";
    retry_all: "Повторить всё найденное…", "Retry all that match…";
    retry_preview_title: "Повторить доставки по фильтру", "Retry deliveries by filter";
    will_retry: "Будет отправлено заново доставок:", "Deliveries to be retried:";
    confirm_retry: "Да, отправить заново", "Yes, retry them";
    nothing_to_retry: "Фильтр не выбирает ни одной доставки, которую можно повторить (failed, dead, cancelled).", "The filter selects no delivery that can be retried (failed, dead, cancelled).";
    retried_title: "Результат повтора", "Retry result";
    requeued: "Снова в очереди", "Queued again";
    still_failing: "Не удалось", "Still failing";
    text_changed: "Текст изменился", "Text changed";
    text_same: "Текст тот же", "Text unchanged";
    notice_queued: "Доставка снова в очереди.", "The delivery is queued again.";
    notice_failed: "Шаблон по-прежнему не рендерится; доставка осталась failed.", "It still does not render; the delivery stays failed.";
    notice_cancelled: "Доставка отменена.", "The delivery is cancelled.";
    at: "Время", "Time";
    http_status: "HTTP", "HTTP";
    market_errors: "Ошибки Маркета", "Market errors";
    latency: "Задержка, мс", "Latency, ms";
    outcome: "Итог", "Outcome";
    no_attempts: "Попыток не было.", "No attempts yet.";
    payload: "Данные события", "Event payload";
    back: "Назад", "Back";
    error_title: "Ошибка", "Error";
    pg_intro: "Выберите источник, вставьте событие или загрузите сохранённое, и посмотрите, какие маршруты сработают и какой текст получится. Ничего не сохраняется и не отправляется.", "Pick a source, paste an event or load a stored one, and see which routes match and what text they render. Nothing is saved or sent.";
    pg_load: "Загрузить сохранённое", "Load a stored one";
    pg_delivery_id: "ID доставки", "Delivery id";
    pg_event_id: "ID события", "Event id";
    pg_load_button: "Загрузить", "Load";
    pg_event_json: "Событие (JSON)", "Event (JSON)";
    pg_template: "Шаблон для правки", "Template to edit";
    pg_template_none: "— как в работе —", "— as in force —";
    pg_template_text: "Текст шаблона (не сохраняется)", "Template text (not saved)";
    pg_run: "Проверить", "Try it";
    pg_results: "Результат", "Result";
    pg_no_match: "Ни один маршрут не подходит к этому событию.", "No route matches this event.";
    pg_render_error: "Ошибка рендера", "Render error";
    pg_edited_error: "Отредактированный шаблон не компилируется", "The edited template does not compile";
    pg_event_error: "Событие не принято", "The event is not accepted";
    pg_live: "Результат обновляется при вводе.", "The result updates as you type.";
    pg_loaded: "Загружено событие", "Loaded event";
}

/// A state's name for people, in the page's language.
pub fn state_name(l: &Labels, state: DeliveryState) -> &'static str {
    match state {
        DeliveryState::Queued => l.queued,
        DeliveryState::Sending => l.sending,
        DeliveryState::Delivered => l.delivered,
        DeliveryState::Held => l.held,
        DeliveryState::Dead => l.dead,
        DeliveryState::Failed => l.failed,
        DeliveryState::Cancelled => l.cancelled,
    }
}
