//! The core flow: webhook in, message out.

use crate::helpers::*;

#[actix_rt::test]
async fn a_shipped_order_reaches_the_buyer_with_its_tracking_number() {
    let app = spawn_app().await;
    let (status, body) = app.post_event("oms", &sample("order_shipped")).await;
    assert_eq!(status, 202, "{body}");
    let id = body["deliveries"][0]["id"].as_i64().unwrap();
    app.wait_for_state(id, "delivered").await;
    let got = app.market.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].business_id, 111);
    assert_eq!(got[0].chat_id, 5001);
    assert_eq!(
        got[0].message,
        "Здравствуйте! Ваш заказ №51234567 отправлен: 3 товара уже в пути.\nСлужба доставки: СДЭК, трек-номер для отслеживания: RU123456789.\nС уважением, команда Дом & Сад \"Уют\""
    );
    app.stop().await;
}
